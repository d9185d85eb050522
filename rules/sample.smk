# Stage 3: samples from a trained model with each of the cell's named samplers.


rule sample:
    input:
        model=cell_path(CELL_FILES["model"]),
    output:
        samples=cell_path(CELL_FILES["samples"]),
        grid=report(
            cell_path(CELL_FILES["grid"]),
            caption="../workflow/report/grid.rst",
            category="Samples",
            subcategory="{dataset} {eps} {variant}",
            labels={
                "dataset": "{dataset}",
                "eps": "{eps}",
                "seed": "{seed}",
                "sampler": "{sampler}",
            },
        ),
    log:
        cell_path("logs/sample_{sampler}.log"),
    benchmark:
        cell_path("benchmarks/sample_{sampler}.tsv")
    conda:
        "../environment.yml"
    threads: rule_threads("sample")
    resources:
        **rule_resources("sample"),
    params:
        settings=stage_settings("sample"),
        code=code_hash("sample"),
    shell:
        "python -m dpdm sample --settings {params.settings:q} --model {input.model:q}"
        " --sampler {wildcards.sampler} --out {output.samples:q} --grid {output.grid:q} > {log:q} 2>&1"
