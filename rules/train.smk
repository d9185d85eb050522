# Stage 2: DP-SGD training of one cell's diffusion model (the only rule that reads
# the private training set for the generator). Checkpoints live in the cell's
# checkpoints/ folder, which is not an output, so a retry after a time limit resumes.


rule train:
    input:
        train=DATA + "/{dataset}/train.npz",
        meta=DATA + "/{dataset}/meta.json",
    output:
        model=CELL + "/model.pt",
        ledger=CELL + "/privacy.json",
        metrics=CELL + "/train_metrics.csv",
    params:
        settings=stage_settings("train"),
        code=code_hash("data", "networks", "diffusion", "privacy", "train"),
    threads: rule_threads("train")
    resources:
        **rule_resources("train"),
    log:
        CELL + "/logs/train.log",
    benchmark:
        CELL + "/benchmarks/train.tsv"
    shell:
        "python -m dpdm train --settings {params.settings:q} --data {DATA}/{wildcards.dataset}"
        " --out {RESULTS}/{wildcards.dataset}/{wildcards.eps}/seed{wildcards.seed} >> {log:q} 2>&1"
