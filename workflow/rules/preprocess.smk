# Brain extraction, one job per subject, into BIDS derivatives.

BRAIN_EXTRACTION = STUDY["brain_extraction"]


rule brain_extraction:
    input:
        data=f"{ROOT}/data",
    output:
        brain=f"{ROOT}/derivatives/dynomp/sub-{{subject}}/anat/sub-{{subject}}_desc-brain_T1w.nii.gz",
        mask=f"{ROOT}/derivatives/dynomp/sub-{{subject}}/anat/sub-{{subject}}_desc-brain_mask.nii.gz",
    params:
        method=BRAIN_EXTRACTION["method"],
        threshold=BRAIN_EXTRACTION["fractional_threshold"],
        iterations=BRAIN_EXTRACTION["iterations"],
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        f"{ROOT}/logs/brain_extraction/sub-{{subject}}.log",
    container:
        CPU_IMAGE
    shell:
        "dynomp brain-extract --bids {input.data} --subject {wildcards.subject} "
        "--method {params.method} --fractional-threshold {params.threshold} "
        "--iterations {params.iterations} --mask {output.mask} --brain {output.brain} > {log} 2>&1"
