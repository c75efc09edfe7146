# Config loading and validation, and the input functions every rule file uses.
import sys
from pathlib import Path

import yaml
from snakemake_interface_executor_plugins.settings import DeploymentMethod

from dynomp import workflow as study_workflow

DEFAULT_CONFIG = "configs/default.yaml"
SCHEMA = Path(workflow.basedir, "workflow/schemas/config.schema.yaml")

if "study" not in config:  # no --configfile: the embedded default, with any --config on top
    given = yaml.safe_load(Path(workflow.basedir, DEFAULT_CONFIG).read_text())
    given.update(config)
    config.clear()
    config.update(given)
try:
    STUDY = study_workflow.load_study_config(config, schema=SCHEMA)
except ValueError as error:
    sys.exit(f"error: {error}")


onstart:
    # before the first job, and not in a dry run, which needs neither a cluster nor the images
    if DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method:
        try:
            study_workflow.check_containers(STUDY)
        except ValueError as error:
            sys.exit(f"error: {error}")

ROOT = f"{STUDY['results']}/{STUDY['study']}"
DATA = STUDY["data"]
EMBEDDED = DATA["source"] == study_workflow.EMBEDDED_SOURCE
TEMPLATE = STUDY["template"]
TEMPLATE_PREFIX = f"{ROOT}/template/tpl-{TEMPLATE['name']}_res-{TEMPLATE['resolution']:02d}"
REGISTRATION = STUDY["registration"]
LEARNING = STUDY["learning"]
CPU_IMAGE = STUDY["containers"]["cpu"]
CUDA_IMAGE = STUDY["containers"]["cuda"]
FIXED_SUBJECTS = study_workflow.subject_labels(STUDY)

wildcard_constraints:
    subject="[A-Za-z0-9]+",
    dim="[23]",


def subjects(wildcards=None):
    """Subject labels: from the config, or read from the cloned dataset after `fetch`."""
    if FIXED_SUBJECTS is not None:
        return FIXED_SUBJECTS
    dataset = checkpoints.fetch.get().output[0]
    return study_workflow.discovered_subjects(dataset, subjects=DATA["subjects"])


def registration_runs(wildcards=None):
    """Every registration run folder of the study (subject x arm)."""
    return [
        f"{ROOT}/registration/sub-{subject}/{arm}"
        for subject in subjects()
        for arm in REGISTRATION["arms"]
    ]


def learning_runs(wildcards=None):
    """Every learning run folder (dimension x arm)."""
    return [f"{ROOT}/learning/{dim}d/{arm}" for dim in LEARNING["dims"] for arm in LEARNING["arms"]]


def gpu_count(device):
    """Slurm GPUs a job needs."""
    return 1 if device == "cuda" else 0
