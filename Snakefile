# dynomp study workflow: data -> brain extraction -> registration and learning arms -> report.
#   snakemake --cores 2                                   the embedded default (configs/default.yaml)
#   snakemake --cores 2 --configfile configs/X.yaml       another study
#   snakemake --profile slurm --configfile configs/X.yaml on a cluster (`dynomp profile install slurm`)
#   snakemake -n ...                                      dry run
#   snakemake --cores 2 --forcerun register_dynomp        rerun one registration arm (train_dynomp: learning)
# Rules are thin: each names its files and resources and calls `dynomp ...`.

report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/registration.smk"
include: "workflow/rules/learning.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        report_outputs(),
    default_target: True
