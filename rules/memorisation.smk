# Stage 4b: the memorisation check of every sample set (dpdm/memorisation.py): nearest
# training and test images of every sample, near-copies by Carlini et al. 2023's
# criterion. It reads the private training set: its JSON is labelled as not covered by
# DP, and its figure of the closest sample / training pairs goes to the cell's private/
# folder unless config memorisation.publish_pairs opts in.


rule memorisation:
    input:
        samples=cell_path(CELL_FILES["samples"]),
        train=data_path("{dataset}/train.npz"),
        test=data_path("{dataset}/test.npz"),
        weights=memorisation_weights_input,
    output:
        json=cell_path(CELL_FILES["memorisation"]),
        pairs=cell_path(CELL_FILES[MEMORISATION_FIGURE or "pairs"]),
    log:
        cell_path("logs/memorisation_{sampler}.log"),
    benchmark:
        cell_path("benchmarks/memorisation_{sampler}.tsv")
    conda:
        "../environment.yml"
    threads: rule_threads("fid" if MEMORISATION_FEATURES else "default")
    resources:
        **rule_resources("fid" if MEMORISATION_FEATURES else "default"),
    params:
        settings=stage_settings("memorisation"),
        options=memorisation_options(),
        code=code_hash("memorisation"),
    shell:
        "python -m dpdm memorisation --samples {input.samples:q} --train {input.train:q} --test {input.test:q}"
        " --out {output.json:q} --pairs {output.pairs:q} --settings {params.settings:q} {params.options}"
        " > {log:q} 2>&1"
