# DPDM: every table and figure of "Differentially Private Diffusion Models"
# (Dockhorn, Cao, Vahdat, Kreis; TMLR 2023), end to end.
#
#   snakemake all --cores 2 --configfile config/smoke.yaml   # tiny, offline, CPU
#   snakemake --profile slurm all                             # the paper, on SLURM
#   snakemake --profile slurm ablations                       # every ablation table
#   snakemake --profile slurm results/tables/table3.tex       # one ablation table
#   snakemake --profile slurm audit                           # the privacy audits (config audit.cells)
#
# Config: config/config.yaml (+ --configfile overrides), validated against
# workflow/schemas/config.schema.yaml; every key is documented in config/README.md.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"


wildcard_constraints:
    dataset="|".join(DATASETS),
    eps=r"eps[0-9.e+-]+",
    variant=r"(?:[A-Za-z0-9.-]+/)?",
    seed=r"[0-9]+",
    sampler=r"[A-Za-z0-9-]+",
    classifier="|".join(CLASSIFIERS),
    split="train|test",
    name=r"[A-Za-z0-9_-]+",


include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/train.smk"
include: "rules/sample.smk"
include: "rules/evaluate.smk"
include: "rules/memorisation.smk"
include: "rules/report.smk"
include: "rules/audit.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
