# Data: the embedded cohort (when the study uses it), the DataLad clone + get, the template.

localrules: fetch, template


if EMBEDDED:

    rule cohort:
        output:
            directory(f"{ROOT}/sources/cohort"),
        params:
            subjects=DATA["subjects"],
            resolution=DATA["resolution"],
            seed=STUDY["seed"],
        log:
            f"{ROOT}/logs/cohort.log",
        container:
            CPU_IMAGE
        shell:
            "dynomp cohort --out {output} --subjects {params.subjects} "
            "--resolution {params.resolution} --seed {params.seed} > {log} 2>&1"


checkpoint fetch:
    input:
        rules.cohort.output if EMBEDDED else [],
    output:
        directory(f"{ROOT}/data"),
    params:
        source=rules.cohort.output[0] if EMBEDDED else DATA["source"],
        subjects=f"--subjects {' '.join(FIXED_SUBJECTS)}" if FIXED_SUBJECTS else "",
        also=f"--also {' '.join(DATA['also'])}" if DATA["also"] else "",
        layout=DATA["layout"],
    log:
        f"{ROOT}/logs/fetch.log",
    container:
        CPU_IMAGE
    shell:
        "dynomp fetch --source {params.source} --dest {output} --layout {params.layout} "
        "{params.subjects} {params.also} > {log} 2>&1"


rule template:
    output:
        brain=f"{TEMPLATE_PREFIX}_desc-brain_T1w.nii.gz",
        labels=[f"{TEMPLATE_PREFIX}_dseg.nii.gz"] if TEMPLATE["labels"] else [],
    params:
        home=f"{ROOT}/templateflow",
        name=TEMPLATE["name"],
        resolution=TEMPLATE["resolution"],
        labels=f"--labels {TEMPLATE_PREFIX}_dseg.nii.gz" if TEMPLATE["labels"] else "",
    log:
        f"{ROOT}/logs/template.log",
    container:
        CPU_IMAGE
    shell:
        "dynomp template --home {params.home} --template {params.name} "
        "--resolution {params.resolution} --brain {output.brain} {params.labels} > {log} 2>&1"
