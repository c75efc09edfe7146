"""The study workflow's Python side: config validation, subject lists, rule names, and `dynomp profile`.

The Snakefile and workflow/rules/*.smk stay declarative; everything they decide is decided here,
where it is unit-tested:

- ``load_study_config`` checks a study config against ``workflow/schemas/config.schema.yaml``
  (JSON Schema, draft 7) and against what the schema cannot say (a local dataset that does not
  exist, a baseline arm that does not run, a registration config file that is missing), fills in the
  schema's defaults, and fails with one line naming the key. jsonschema's own messages run over
  several lines and name the schema path, not the key a user wrote, so the first error is rewritten.
- ``check_containers`` is run only when Snakemake deploys software with Apptainer.
- ``install_profile`` writes the Slurm (or local) profile into Snakemake's user config folder, so
  that ``snakemake --profile slurm`` works as written in the README.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dynomp.atomic import write_text_atomic

EMBEDDED_SOURCE = "embedded"
EMBEDDED_TEMPLATE = "MNI152NLin2009aSym"
# dynomp.registration.config.PRESETS (a test keeps them equal); importing that module here would
# load torch into every Snakemake start-up and cluster job, about 3 s each
REGISTRATION_PRESETS = ("paper", "quick")
PROFILES = ("slurm", "local")
# the repository's workflow folder, when dynomp runs from a checkout (editable install)
REPOSITORY = Path(__file__).resolve().parents[2]


def _key_path(parts: Sequence[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _schema_error_line(error) -> str:
    """One line naming the key a user wrote, from a jsonschema ValidationError."""
    key = _key_path(list(error.absolute_path))
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        name = _key_path([*error.absolute_path, unknown[0]]) if unknown else key
        return f"config key {name}: unknown key (known here: {', '.join(allowed)})"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return f"config key {_key_path([*error.absolute_path, missing])}: required"
    if error.validator == "enum":
        allowed = ", ".join(str(value) for value in error.validator_value)
        return f"config key {key}: {error.instance!r} is not one of: {allowed}"
    if error.validator == "oneOf":
        description = error.schema.get("description", "").split(";")[0].strip()
        return f"config key {key}: {error.instance!r} is not valid ({description})"
    return f"config key {key}: {error.message}"


def _fill_defaults(instance: dict, schema: Mapping) -> dict:
    """Set each absent property that has a schema default, recursively into objects."""
    for name, subschema in schema.get("properties", {}).items():
        if name not in instance and "default" in subschema:
            instance[name] = copy.deepcopy(subschema["default"])
        if isinstance(instance.get(name), dict) and subschema.get("type") == "object":
            _fill_defaults(instance[name], subschema)
    return instance


def read_schema(path: str | os.PathLike) -> dict:
    """The config schema (YAML)."""
    return yaml.safe_load(Path(path).read_text())


def is_remote(source: str) -> bool:
    """A URL (or DataLad shortcut ///, or git@host:) rather than a local path."""
    return "://" in source or source.startswith(("///", "git@"))


def load_study_config(
    config: Mapping[str, Any], *, schema: str | os.PathLike, workdir: str | os.PathLike = "."
) -> dict[str, Any]:
    """The validated config with defaults filled in; ValueError naming the first bad key."""
    import jsonschema

    raw = copy.deepcopy(dict(config))
    validator = jsonschema.Draft7Validator(read_schema(schema))
    errors = sorted(validator.iter_errors(raw), key=lambda error: list(error.absolute_path))
    if errors:
        raise ValueError(_schema_error_line(errors[0]))
    study = _fill_defaults(raw, validator.schema)
    _check_meaning(study, given=config, workdir=Path(workdir))
    return study


def _check_meaning(study: dict, *, given: Mapping, workdir: Path) -> None:
    """What the schema cannot say; each failure is one line naming the key."""
    data, template = study["data"], study["template"]
    registration, learning = study["registration"], study["learning"]
    embedded = data["source"] == EMBEDDED_SOURCE
    if embedded and not isinstance(data["subjects"], int):
        raise ValueError("config key data.subjects: the embedded source needs a count of subjects")
    if not embedded and "resolution" in given.get("data", {}):
        raise ValueError("config key data.resolution: only for the embedded source")
    if not (embedded or is_remote(data["source"]) or (workdir / data["source"]).exists()):
        raise ValueError(
            f"config key data.source: {data['source']} does not exist (missing dataset; "
            "give a DataLad URL or an existing local dataset)"
        )
    if data["layout"] == "oasis" and registration["arms"]:
        raise ValueError(
            "config key registration.arms: the oasis layout holds no whole-head T1w images to "
            "register; it is for learning arms only"
        )
    if learning["arms"] and data["layout"] == "bids" and not any(
        path.startswith("derivatives") for path in data["also"]
    ):
        raise ValueError(
            "config key data.also: learning on a BIDS dataset reads its images aligned to a "
            "template (derivatives/*/sub-*_space-*_desc-preproc_T1w); list that folder, "
            "e.g. derivatives/truth"
        )
    if template["labels"] and template["name"] != EMBEDDED_TEMPLATE:
        raise ValueError(
            f"config key template.labels: only {EMBEDDED_TEMPLATE} has a label map here"
        )
    if template["name"] == EMBEDDED_TEMPLATE and template["resolution"] > 8:
        raise ValueError(
            f"config key template.resolution: {EMBEDDED_TEMPLATE} is built here at 1 to 8 mm"
        )
    if registration["arms"] and study["report"]["baseline"] not in registration["arms"]:
        raise ValueError(
            f"config key report.baseline: {study['report']['baseline']} is not among "
            f"registration.arms ({', '.join(registration['arms'])})"
        )
    setting = registration["config"]
    if setting not in REGISTRATION_PRESETS and not (workdir / setting).is_file():
        raise ValueError(
            f"config key registration.config: {setting} is neither a preset "
            f"({', '.join(REGISTRATION_PRESETS)}) nor an existing file"
        )
    sweep = study["report"]["sweep"]
    if sweep is not None and not (workdir / sweep / "sweep_metrics.parquet").is_file():
        raise ValueError(
            f"config key report.sweep: {sweep}/sweep_metrics.parquet does not exist (run "
            f"`dynomp sweep --out {sweep}` first)"
        )
    if learning["config"] is not None and not (workdir / learning["config"]).is_file():
        raise ValueError(f"config key learning.config: {learning['config']} does not exist")
    if learning["arms"] and "steps" not in learning and learning["config"] is None:
        raise ValueError("config key learning.steps: required when learning.config is not given")


def check_containers(study: Mapping[str, Any], *, workdir: str | os.PathLike = ".") -> None:
    """Each container image the study uses exists (local paths; URIs are left to Apptainer)."""
    needed = {"cpu"}
    if study["registration"]["device"] == "cuda" or study["learning"]["arms"]:
        needed.add("cuda")
    for name in sorted(needed):
        image = study["containers"][name]
        if "://" not in image and not (Path(workdir) / image).is_file():
            raise ValueError(
                f"config key containers.{name}: {image} does not exist (build it with "
                f"`apptainer build {image} containers/dynomp-{name}.def`)"
            )


def subject_labels(study: Mapping[str, Any]) -> list[str] | None:
    """The subjects, when the config fixes them; None when they are found in the cloned dataset."""
    subjects = study["data"]["subjects"]
    if study["data"]["source"] == EMBEDDED_SOURCE:
        from dynomp.data.cohort import subject_id

        return [subject_id(index) for index in range(subjects)]
    if isinstance(subjects, list):
        return [label.removeprefix("sub-") for label in subjects]
    return None


def discovered_subjects(dataset: str | os.PathLike, *, subjects: int | str) -> list[str]:
    """Subject labels of a cloned dataset: all, or the first `subjects` in sorted order."""
    labels = sorted(
        folder.name.removeprefix("sub-")
        for folder in Path(dataset).glob("sub-*")
        if folder.is_dir()
    )
    if not labels:
        raise ValueError(f"{dataset}: no sub-* folder in the cloned dataset")
    if isinstance(subjects, int):
        if subjects > len(labels):
            raise ValueError(
                f"config key data.subjects: asks for {subjects}, the dataset has {len(labels)}"
            )
        return labels[:subjects]
    return labels


def rule_name(prefix: str, arm: str) -> str:
    """The rule of one arm, e.g. register_ants_fp64, for `snakemake --forcerun`."""
    return f"{prefix}_{arm.replace('-', '_')}"


def write_list(path: str | os.PathLike, items: Sequence[str]) -> Path:
    """One item per line, atomically (argument files for `dynomp tables @FILE`)."""
    return write_text_atomic(Path(path), "".join(f"{item}\n" for item in items))


# --- dynomp profile -------------------------------------------------------------------------


def profile_folder(name: str) -> Path:
    """Where Snakemake looks up `--profile NAME`: its user config folder (XDG_CONFIG_HOME aware)."""
    from platformdirs import AppDirs

    return Path(AppDirs("snakemake", "snakemake").user_config_dir) / name


def render_profile(
    name: str,
    *,
    account: str | None,
    partition: str | None,
    apptainer: bool = True,
    gpu: bool = True,
    source: Path | None = None,
) -> str:
    """The profile's config.yaml: the repository's template with account, partition and options."""
    if name not in PROFILES:
        raise ValueError(f"profile: unknown profile {name!r} (known: {', '.join(PROFILES)})")
    template = (source or REPOSITORY / "workflow" / "profiles") / name / "config.yaml"
    if not template.is_file():
        raise FileNotFoundError(f"{template}: profile template not found")
    profile = yaml.safe_load(template.read_text())
    if name == "slurm":
        if not account or not partition:
            raise ValueError("profile slurm: --account and --partition are required")
        profile["default-resources"]["slurm_account"] = account
        profile["default-resources"]["slurm_partition"] = partition
    if not apptainer:
        profile.pop("software-deployment-method", None)
        profile.pop("apptainer-args", None)
    if not gpu:
        for resources in profile.get("set-resources", {}).values():
            resources.pop("gpu", None)
    header = (
        f"# Snakemake profile `{name}` written by `dynomp profile install {name}`;\n"
        f"# template: {template}\n"
    )
    return header + yaml.safe_dump(profile, sort_keys=False)


def install_profile(
    name: str,
    *,
    account: str | None = None,
    partition: str | None = None,
    apptainer: bool = True,
    gpu: bool = True,
    dest: Path | None = None,
    force: bool = False,
) -> Path:
    """Write the profile into Snakemake's config folder (or `dest`); returns its config.yaml."""
    text = render_profile(name, account=account, partition=partition, apptainer=apptainer, gpu=gpu)
    folder = dest or profile_folder(name)
    target = folder / "config.yaml"
    if target.exists() and not force:
        raise ValueError(f"{target}: exists; pass --force to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(target, text)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `dynomp profile install`."""
    parser = subparsers.add_parser(
        "profile", help="install a Snakemake profile (slurm or local) for `snakemake --profile`"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    install = actions.add_parser("install", help="write the profile into Snakemake's config folder")
    install.add_argument("name", choices=PROFILES, help="slurm or local")
    install.add_argument("--account", help="Slurm account (sbatch --account)")
    install.add_argument("--partition", help="Slurm partition (sbatch --partition)")
    install.add_argument(
        "--no-apptainer", action="store_true",
        help="run jobs in the current environment instead of the Apptainer images",
    )
    install.add_argument(
        "--no-gpu", action="store_true", help="do not ask Slurm for GPUs (CPU-only clusters)"
    )
    install.add_argument(
        "--dest", type=Path, help="profile folder (default: Snakemake's user config folder/NAME)"
    )
    install.add_argument("--force", action="store_true", help="replace an existing profile")
    install.set_defaults(handler=profile_install_command)


def profile_install_command(args: argparse.Namespace) -> int:
    """Install the profile and print where it is and how to use it."""
    path = install_profile(
        args.name,
        account=args.account,
        partition=args.partition,
        apptainer=not args.no_apptainer,
        gpu=not args.no_gpu,
        dest=args.dest,
        force=args.force,
    )
    print(f"wrote {path}")
    print(f"use it with: snakemake --profile {args.dest or args.name} --configfile configs/default.yaml")
    return 0
