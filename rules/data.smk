# Stage 1: raw files -> data/{dataset}/{train,test}.npz + meta.json, FID reference statistics.
# Downloads need the internet, which cluster compute nodes often lack: local rules.


localrules:
    prepare,
    fetch_fid_weights,


rule prepare:
    output:
        train=DATA + "/{dataset}/train.npz",
        test=DATA + "/{dataset}/test.npz",
        meta=DATA + "/{dataset}/meta.json",
    params:
        raw=lambda wc: dpcfg.env_or(config["paths"]["raw"], "DPDM_RAW_DIR") or "raw",
        digits_size=lambda wc: dataset_settings(wc.dataset)["data"]["digits_size"],
        code=code_hash("data"),
    log:
        RESULTS + "/logs/prepare/{dataset}.log",
    benchmark:
        RESULTS + "/benchmarks/prepare/{dataset}.tsv"
    shell:
        "python -m dpdm prepare --dataset {wildcards.dataset} --out {DATA}/{wildcards.dataset}"
        " --raw-dir {params.raw:q} --digits-size {params.digits_size} > {log:q} 2>&1"


rule fetch_fid_weights:
    output:
        FID_WEIGHTS_DEFAULT,
    log:
        RESULTS + "/logs/fetch_fid_weights.log",
    shell:
        "python -m dpdm fetch-weights --out {output:q} > {log:q} 2>&1"


rule fid_reference:
    input:
        data=DATA + "/{dataset}/{split}.npz",
        weights=fid_weights_input,
    output:
        DATA + "/{dataset}/fid_{split}.npz",
    params:
        fid=fid_args(),
        code=code_hash("data", "fid"),
    threads: rule_threads("fid")
    resources:
        **rule_resources("fid"),
    log:
        RESULTS + "/logs/fid_reference/{dataset}_{split}.log",
    benchmark:
        RESULTS + "/benchmarks/fid_reference/{dataset}_{split}.tsv"
    shell:
        "python -m dpdm fid-ref --data {DATA}/{wildcards.dataset} --split {wildcards.split}"
        " --out {output:q} {params.fid} > {log:q} 2>&1"
