# Registration arms: one rule per arm (register_<arm>), one job per subject.
# Rerun one arm for every subject: snakemake --cores 2 --forcerun register_dynomp


MOVING_LABELS = (
    f"--moving-labels {ROOT}/data/derivatives/{DATA['labels']}/sub-{{subject}}/anat/"
    "sub-{subject}_dseg.nii.gz"
    if DATA["labels"]
    else ""
)
FIXED_LABELS = f"--fixed-labels {TEMPLATE_PREFIX}_dseg.nii.gz" if TEMPLATE["labels"] else ""


for registration_arm in REGISTRATION["arms"]:

    rule:
        name:
            study_workflow.rule_name("register", registration_arm)
        input:
            data=f"{ROOT}/data",
            fixed=rules.template.output.brain,
            fixed_labels=rules.template.output.labels,
            moving=rules.brain_extraction.output.brain,
        output:
            directory(f"{ROOT}/registration/sub-{{subject}}/{registration_arm}"),
        params:
            arm=registration_arm,
            config=REGISTRATION["config"],
            device=REGISTRATION["device"],
            fixed_labels=FIXED_LABELS,
            moving_labels=MOVING_LABELS,
        threads: REGISTRATION["threads"]
        resources:
            mem_mb=REGISTRATION["mem_mb"],
            runtime=REGISTRATION["runtime"],
            gpu=gpu_count(REGISTRATION["device"]),
        log:
            f"{ROOT}/logs/registration/sub-{{subject}}_{registration_arm}.log",
        container:
            CUDA_IMAGE if REGISTRATION["device"] == "cuda" else CPU_IMAGE
        shell:
            "dynomp register --fixed {input.fixed} --moving {input.moving} --arm {params.arm} "
            "{params.fixed_labels} {params.moving_labels} --config {params.config} "
            "--device {params.device} --threads {threads} --out {output} > {log} 2>&1"
