# Public pre-training (issue 17): ordinary, non-private training of the denoiser on a
# public dataset named in config `pretrain.<name>`, shared by every cell whose
# train.init.pretrained names it (DP fine-tuning; dpdm/pretrain.py, dpdm/finetune.py).
# Like train: `exec` so SLURM's warning signal reaches python, which checkpoints in the
# model's checkpoints/ folder and exits 75; the retry resumes. Its resources are
# config resources.pretrain (the train rule's when absent).


rule pretrain:
    input:
        get_pretrain_data,
    output:
        model=pretrain_path("{name}", "model.pt"),
        record=pretrain_path("{name}", "pretrain.json"),
        metrics=pretrain_path("{name}", "train_metrics.csv"),
    log:
        pretrain_path("{name}", "logs/pretrain.log"),
    benchmark:
        pretrain_path("{name}", "benchmarks/pretrain.tsv")
    conda:
        "../environment.yml"
    threads: rule_threads("pretrain")
    resources:
        **rule_resources("pretrain"),
    params:
        data=lambda wildcards, input: os.path.dirname(input[0]),
        out=lambda wildcards: pretrain_path(wildcards.name, ""),
        attempts=lambda wildcards: pretrain_path(
            wildcards.name, "logs/pretrain_attempts.log"
        ),
        settings=get_pretrain_settings,
        code=code_hash("pretrain"),
    shell:
        "exec python -m dpdm pretrain --settings {params.settings:q} --data {params.data:q} --out {params.out:q}"
        " --stop-with-parent --log-file {params.attempts:q} > {log:q} 2>&1"
