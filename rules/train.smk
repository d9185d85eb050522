# Stage 2: DP-SGD training of one cell's diffusion model (the only rule that reads
# the private training set for the generator). Checkpoints live in the cell's
# checkpoints/ folder, which is not an output, so a retry after a time limit resumes.
# `exec`: python replaces the shell, so SLURM's warning signal (slurm_extra
# --signal=TERM@...) reaches training and nothing around it dies first; and with
# --stop-with-parent, training checkpoints and exits if Snakemake itself is killed.
# logs/train.log holds the last attempt (Snakemake empties a log when a job starts);
# logs/train_attempts.log keeps every attempt, each under a numbered header.
# Several GPUs / CPU ranks / nodes: `python -m dpdm train --procs-per-node P --nodes N`
# execs torchrun (under srun on several nodes; dpdm/launch.py). The counts are resources,
# not params: a finished cell is not rerun when the GPU count changes, and an unfinished
# one resumes its checkpoint on any number of processes.


rule train:
    input:
        train=data_path("{dataset}/train.npz"),
        meta=data_path("{dataset}/meta.json"),
        init=get_init_model,  # train.init.pretrained: the public model (rules/pretrain.smk)
    output:
        model=cell_path(CELL_FILES["model"]),
        ledger=cell_path(CELL_FILES["privacy"]),
        metrics=cell_path(CELL_FILES["metrics"]),
    log:
        cell_path("logs/train.log"),
    benchmark:
        cell_path("benchmarks/train.tsv")
    priority: 10  # the longest chain: start training first
    conda:
        "../environment.yml"
    threads: rule_threads("train")
    resources:
        **rule_resources("train"),
    params:
        data=get_data_dir,
        out=get_cell_dir,
        attempts=get_attempts_log,
        settings=stage_settings("train"),
        code=code_hash("train"),
        init=get_init_arg,
    shell:
        "exec python -m dpdm train --settings {params.settings:q} --data {params.data:q} --out {params.out:q}"
        " {params.init} --procs-per-node {resources.procs_per_node} --nodes {resources.proc_nodes} --stop-with-parent"
        " --log-file {params.attempts:q} > {log:q} 2>&1"
