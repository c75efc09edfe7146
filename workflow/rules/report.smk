# Report: tidy tables, statistics and figures from every run, for `snakemake --report`.

localrules: run_lists

TABLES = [
    "registration_metrics", "registration_trace", "learning_metrics", "learning_evaluation",
    "learning_trace", "runs", "sweep_metrics",
]
STATISTICS = ["loss_difference", "arm_comparison", "learning_summary"]
FIGURES = ["pmin_traces", "loss_curves", "registration_by_arm", "learning_by_arm"]
CAPTIONS = Path(workflow.basedir, "workflow/report")


rule run_lists:
    input:
        registration=registration_runs,
        learning=[f"{run}/evaluation.parquet" for run in learning_runs()],
    output:
        registration=f"{ROOT}/tables/registration_runs.txt",
        learning=f"{ROOT}/tables/learning_runs.txt",
    run:
        study_workflow.write_list(output.registration, input.registration)
        study_workflow.write_list(output.learning, [str(Path(p).parent) for p in input.learning])


rule tables:
    input:
        registration=rules.run_lists.output.registration,
        learning=rules.run_lists.output.learning,
        sweep=[f"{STUDY['report']['sweep']}/sweep_metrics.parquet"] if STUDY["report"]["sweep"] else [],
    output:
        [f"{ROOT}/tables/{name}.{suffix}" for name in TABLES for suffix in ("parquet", "tsv")],
    params:
        out=f"{ROOT}/tables",
        sweep=f"--sweep {STUDY['report']['sweep']}" if STUDY["report"]["sweep"] else "",
    log:
        f"{ROOT}/logs/tables.log",
    container:
        CPU_IMAGE
    shell:
        "dynomp tables --out {params.out} --registration @{input.registration} "
        "--learning @{input.learning} {params.sweep} > {log} 2>&1"


rule stats:
    input:
        rules.tables.output,
    output:
        [
            report(f"{ROOT}/stats/{name}.tsv", caption=CAPTIONS / f"{name}.rst", category="Statistical tests")
            for name in STATISTICS
        ],
        [f"{ROOT}/stats/{name}.parquet" for name in STATISTICS],
    params:
        tables=f"{ROOT}/tables",
        out=f"{ROOT}/stats",
        baseline=STUDY["report"]["baseline"],
        alpha=STUDY["report"]["alpha"],
    log:
        f"{ROOT}/logs/stats.log",
    container:
        CPU_IMAGE
    shell:
        "dynomp stats --tables {params.tables} --out {params.out} --baseline {params.baseline} "
        "--alpha {params.alpha} > {log} 2>&1"


rule figures:
    input:
        rules.tables.output,
    output:
        [
            report(f"{ROOT}/figures/{name}.png", caption=CAPTIONS / f"{name}.rst", category="Figures")
            for name in FIGURES
        ],
        [f"{ROOT}/figures/{name}.svg" for name in FIGURES],
    params:
        tables=f"{ROOT}/tables",
        out=f"{ROOT}/figures",
    log:
        f"{ROOT}/logs/figures.log",
    container:
        CPU_IMAGE
    shell:
        "dynomp figures --tables {params.tables} --out {params.out} > {log} 2>&1"


def report_outputs():
    """What `rule all` asks for: the statistics and figures (and through them every run).

    The template is named too, so that a dry run shows it before the subjects are known.
    """
    template = [rules.template.output.brain] if REGISTRATION["arms"] else []
    return rules.stats.output + rules.figures.output + template
