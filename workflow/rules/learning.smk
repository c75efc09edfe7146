# Learning arms: VoxelMorph trained under each precision strategy (train_<arm>), in 2D and/or 3D,
# then evaluated on held-out pairs (evaluate_<arm>). A diverged arm is a result: its status is
# kept and its evaluation table is empty.
# Rerun one arm: snakemake --cores 2 --forcerun train_dynomp


def learning_options():
    """Options of `dynomp train` that the study config sets."""
    options = []
    if LEARNING["config"] is not None:
        options.append(f"--config {LEARNING['config']}")
    for key, flag in (("steps", "--steps"), ("batch_size", "--batch-size")):
        if key in LEARNING:
            options.append(f"{flag} {LEARNING[key]}")
    return " ".join(options)


for learning_arm in LEARNING["arms"]:

    rule:
        name:
            study_workflow.rule_name("train", learning_arm)
        input:
            data=f"{ROOT}/data",
        output:
            metrics=f"{ROOT}/learning/{{dim}}d/{learning_arm}/metrics.json",
            status=f"{ROOT}/learning/{{dim}}d/{learning_arm}/status.json",
            trace=f"{ROOT}/learning/{{dim}}d/{learning_arm}/trace.parquet",
        params:
            arm=learning_arm,
            run=f"{ROOT}/learning/{{dim}}d/{learning_arm}",
            options=learning_options(),
            device=LEARNING["device"],
            seed=STUDY["seed"],
        threads: LEARNING["threads"]
        resources:
            mem_mb=LEARNING["mem_mb"],
            runtime=LEARNING["runtime"],
            gpu=gpu_count(LEARNING["device"]),
        log:
            f"{ROOT}/logs/learning/{{dim}}d_{learning_arm}_train.log",
        container:
            CUDA_IMAGE
        shell:
            "dynomp train --arm {params.arm} --data {input.data} --out {params.run} "
            "--dim {wildcards.dim} {params.options} --device {params.device} --seed {params.seed} "
            "--threads {threads} --quiet > {log} 2>&1"

    rule:
        name:
            study_workflow.rule_name("evaluate", learning_arm)
        input:
            data=f"{ROOT}/data",
            status=f"{ROOT}/learning/{{dim}}d/{learning_arm}/status.json",
        output:
            f"{ROOT}/learning/{{dim}}d/{learning_arm}/evaluation.parquet",
        params:
            run=f"{ROOT}/learning/{{dim}}d/{learning_arm}",
        threads: LEARNING["threads"]
        resources:
            mem_mb=LEARNING["mem_mb"],
            runtime=30,
            gpu=gpu_count(LEARNING["device"]),
        log:
            f"{ROOT}/logs/learning/{{dim}}d_{learning_arm}_evaluate.log",
        container:
            CUDA_IMAGE
        shell:
            "dynomp evaluate-model --run {params.run} --data {input.data} --out {output} > {log} 2>&1"
