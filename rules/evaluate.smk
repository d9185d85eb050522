# Stage 4: FID of each sample set, classifiers trained on samples and tested on the
# real test set, and DP-SGD classifiers trained on real data (paper Table 2).


rule fid:
    input:
        samples=cell_path(CELL_FILES["samples"]),
        refs=get_fid_references,
        weights=fid_weights_input,
    output:
        cell_path(CELL_FILES["fid"]),
    log:
        cell_path("logs/fid_{sampler}.log"),
    benchmark:
        cell_path("benchmarks/fid_{sampler}.tsv")
    conda:
        "../environment.yml"
    threads: rule_threads("fid")
    resources:
        **rule_resources("fid"),
    params:
        settings=stage_settings("fid"),
        refs=get_ref_args,
        fid=fid_args(),
        num=(
            f"--num-samples {config['fid']['num_samples']}"
            if config["fid"]["num_samples"]
            else ""
        ),
        prdc=(f"--prdc-k {config['fid']['prdc_k']}" if config["fid"]["prdc_k"] else ""),
        code=code_hash("fid"),
    shell:
        "python -m dpdm fid --samples {input.samples:q} {params.refs} --out {output:q}"
        " --settings {params.settings:q} {params.fid} {params.num} {params.prdc} > {log:q} 2>&1"


rule classify:
    input:
        samples=cell_path(CELL_FILES["samples"]),
        test=data_path("{dataset}/test.npz"),
    output:
        cell_path(CELL_FILES["classify"]),
    log:
        cell_path("logs/classify_{sampler}_{classifier}.log"),
    benchmark:
        cell_path("benchmarks/classify_{sampler}_{classifier}.tsv")
    conda:
        "../environment.yml"
    threads: rule_threads("classify")
    resources:
        **rule_resources("classify"),
    params:
        settings=stage_settings("classify"),
        code=code_hash("classify"),
    shell:
        "python -m dpdm classify --settings {params.settings:q} --samples {input.samples:q}"
        " --test {input.test:q} --classifier {wildcards.classifier} --out {output:q} > {log:q} 2>&1"


rule baseline:
    input:
        train=data_path("{dataset}/train.npz"),
        test=data_path("{dataset}/test.npz"),
    output:
        results_path(layout.BASELINE),
    log:
        baseline_path("logs/{classifier}.log"),
    benchmark:
        baseline_path("benchmarks/{classifier}.tsv")
    conda:
        "../environment.yml"
    threads: rule_threads("baseline")
    resources:
        **rule_resources("baseline"),
    params:
        data=get_data_dir,
        settings=baseline_settings,
        code=code_hash("baseline"),
    shell:
        "python -m dpdm baseline --settings {params.settings:q} --data {params.data:q}"
        " --classifier {wildcards.classifier} --out {output:q} > {log:q} 2>&1"


rule train_judge:
    input:
        train=data_path("{dataset}/train.npz"),
        test=data_path("{dataset}/test.npz"),
    output:
        data_path("{dataset}/judge_{classifier}.pt"),
    log:
        results_path("logs/train_judge/{dataset}_{classifier}.log"),
    benchmark:
        results_path("benchmarks/train_judge/{dataset}_{classifier}.tsv")
    conda:
        "../environment.yml"
    threads: rule_threads("classify")
    resources:
        **rule_resources("classify"),
    params:
        data=get_data_dir,
        epochs=get_judge_epochs,
        code=code_hash("judge-fit"),
    shell:
        "python -m dpdm judge-fit --data {params.data:q} --classifier {wildcards.classifier}"
        " --epochs {params.epochs} --out {output:q} > {log:q} 2>&1"


rule judge:
    input:
        samples=cell_path(CELL_FILES["samples"]),
        judge=get_judge_file,
    output:
        cell_path(CELL_FILES["judge"]),
    log:
        cell_path("logs/judge_{sampler}.log"),
    benchmark:
        cell_path("benchmarks/judge_{sampler}.tsv")
    conda:
        "../environment.yml"
    threads: 1
    resources:
        **rule_resources("classify"),
    params:
        settings=stage_settings("classify"),
        code=code_hash("judge"),
    shell:
        "python -m dpdm judge --settings {params.settings:q} --judge {input.judge:q} --samples {input.samples:q}"
        " --out {output:q} > {log:q} 2>&1"
