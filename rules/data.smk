# Stage 1: raw files -> data/{dataset}/{train,test}.npz + meta.json, FID reference statistics.
# Downloads need the internet, which cluster compute nodes often lack: local rules.


localrules:
    prepare,
    fetch_fid_weights,


rule prepare:
    output:
        train=data_path("{dataset}/train.npz"),
        test=data_path("{dataset}/test.npz"),
        meta=data_path("{dataset}/meta.json"),
    log:
        results_path("logs/prepare/{dataset}.log"),
    benchmark:
        results_path("benchmarks/prepare/{dataset}.tsv")
    conda:
        "../environment.yml"
    params:
        out=get_data_dir,
        raw=get_raw_dir,
        digits_size=get_digits_size,
        code=code_hash("prepare"),
    shell:
        "python -m dpdm prepare --dataset {wildcards.dataset} --out {params.out:q}"
        " --raw-dir {params.raw:q} --digits-size {params.digits_size} > {log:q} 2>&1"


rule fetch_fid_weights:
    output:
        FID_WEIGHTS_DEFAULT,
    log:
        results_path("logs/fetch_fid_weights.log"),
    benchmark:
        results_path("benchmarks/fetch_fid_weights.tsv")
    conda:
        "../environment.yml"
    shell:
        "python -m dpdm fetch-weights --out {output:q} > {log:q} 2>&1"


rule fid_reference:
    input:
        data=data_path("{dataset}/{split}.npz"),
        weights=fid_weights_input,
    output:
        data_path("{dataset}/fid_{split}.npz"),
    log:
        results_path("logs/fid_reference/{dataset}_{split}.log"),
    benchmark:
        results_path("benchmarks/fid_reference/{dataset}_{split}.tsv")
    conda:
        "../environment.yml"
    threads: rule_threads("fid")
    resources:
        **rule_resources("fid"),
    params:
        data=get_data_dir,
        fid=fid_args(),
        num=(
            f"--num-images {config['fid']['reference_images']}"
            if config["fid"]["reference_images"]
            else ""
        ),
        keep=(
            f"--keep-features {config['fid']['prdc_images']}"
            if config["fid"]["prdc_k"]
            else ""
        ),
        code=code_hash("fid-ref"),
    shell:
        "python -m dpdm fid-ref --data {params.data:q} --split {wildcards.split}"
        " --out {output:q} {params.fid} {params.num} {params.keep} > {log:q} 2>&1"
