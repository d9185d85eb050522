# Stage 4: FID of each sample set, classifiers trained on samples and tested on the
# real test set, and DP-SGD classifiers trained on real data (paper Table 2).


rule fid:
    input:
        samples=cell_path("samples_{sampler}.npz"),
        ref=lambda wc: data_path(f"{wc.dataset}/fid_{config['fid']['reference_split']}.npz"),
        weights=fid_weights_input,
    output:
        cell_path("fid_{sampler}.json"),
    params:
        settings=stage_settings("fid"),
        fid=fid_args(),
        num=lambda wc: (
            f"--num-samples {config['fid']['num_samples']}" if config["fid"]["num_samples"] else ""
        ),
        code=code_hash("data", "fid"),
    threads: rule_threads("fid")
    resources:
        **rule_resources("fid"),
    log:
        cell_path("logs/fid_{sampler}.log"),
    benchmark:
        cell_path("benchmarks/fid_{sampler}.tsv")
    conda:
        "../environment.yml"
    shell:
        "python -m dpdm fid --samples {input.samples:q} --ref {input.ref:q} --out {output:q}"
        " --settings {params.settings:q} {params.fid} {params.num} > {log:q} 2>&1"


rule classify:
    input:
        samples=cell_path("samples_{sampler}.npz"),
        test=data_path("{dataset}/test.npz"),
    output:
        cell_path("classify_{sampler}_{classifier}.json"),
    params:
        settings=stage_settings("classify"),
        code=code_hash("data", "classifiers"),
    threads: rule_threads("classify")
    resources:
        **rule_resources("classify"),
    log:
        cell_path("logs/classify_{sampler}_{classifier}.log"),
    benchmark:
        cell_path("benchmarks/classify_{sampler}_{classifier}.tsv")
    conda:
        "../environment.yml"
    shell:
        "python -m dpdm classify --settings {params.settings:q} --samples {input.samples:q}"
        " --test {input.test:q} --classifier {wildcards.classifier} --out {output:q} > {log:q} 2>&1"


rule baseline:
    input:
        train=data_path("{dataset}/train.npz"),
        test=data_path("{dataset}/test.npz"),
    output:
        results_path("{dataset}/baseline/{eps}/seed{seed}/{classifier}.json"),
    params:
        data=lambda wc: data_path(wc.dataset),
        settings=baseline_settings,
        code=code_hash("data", "privacy", "classifiers"),
    threads: rule_threads("baseline")
    resources:
        **rule_resources("baseline"),
    log:
        results_path("{dataset}/baseline/{eps}/seed{seed}/logs/{classifier}.log"),
    benchmark:
        results_path("{dataset}/baseline/{eps}/seed{seed}/benchmarks/{classifier}.tsv")
    conda:
        "../environment.yml"
    shell:
        "python -m dpdm baseline --settings {params.settings:q} --data {params.data:q}"
        " --classifier {wildcards.classifier} --out {output:q} > {log:q} 2>&1"
