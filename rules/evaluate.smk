# Stage 4: FID of each sample set, classifiers trained on samples and tested on the
# real test set, and DP-SGD classifiers trained on real data (paper Table 2).


rule fid:
    input:
        samples=CELL + "/samples_{sampler}.npz",
        ref=lambda wc: f"{DATA}/{wc.dataset}/fid_{config['fid']['reference_split']}.npz",
        weights=fid_weights_input,
    output:
        CELL + "/fid_{sampler}.json",
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
        CELL + "/logs/fid_{sampler}.log",
    benchmark:
        CELL + "/benchmarks/fid_{sampler}.tsv"
    shell:
        "python -m dpdm fid --samples {input.samples:q} --ref {input.ref:q} --out {output:q}"
        " --settings {params.settings:q} {params.fid} {params.num} > {log:q} 2>&1"


rule classify:
    input:
        samples=CELL + "/samples_{sampler}.npz",
        test=DATA + "/{dataset}/test.npz",
    output:
        CELL + "/classify_{sampler}_{classifier}.json",
    params:
        settings=stage_settings("classify"),
        code=code_hash("data", "classifiers"),
    threads: rule_threads("classify")
    resources:
        **rule_resources("classify"),
    log:
        CELL + "/logs/classify_{sampler}_{classifier}.log",
    benchmark:
        CELL + "/benchmarks/classify_{sampler}_{classifier}.tsv"
    shell:
        "python -m dpdm classify --settings {params.settings:q} --samples {input.samples:q}"
        " --test {input.test:q} --classifier {wildcards.classifier} --out {output:q} > {log:q} 2>&1"


rule baseline:
    input:
        train=DATA + "/{dataset}/train.npz",
        test=DATA + "/{dataset}/test.npz",
    output:
        RESULTS + "/{dataset}/baseline/{eps}/seed{seed}/{classifier}.json",
    params:
        settings=stage_settings("baseline"),
        code=code_hash("data", "privacy", "classifiers"),
    threads: rule_threads("baseline")
    resources:
        **rule_resources("baseline"),
    log:
        RESULTS + "/{dataset}/baseline/{eps}/seed{seed}/logs/{classifier}.log",
    benchmark:
        RESULTS + "/{dataset}/baseline/{eps}/seed{seed}/benchmarks/{classifier}.tsv"
    shell:
        "python -m dpdm baseline --settings {params.settings:q} --data {DATA}/{wildcards.dataset}"
        " --classifier {wildcards.classifier} --out {output:q} > {log:q} 2>&1"
