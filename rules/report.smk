# Stage 5: result files -> LaTeX/CSV tables and matplotlib figures: the paper's main
# tables (rule report) and one table + figure per ablation (rule ablation, by table
# name). Numbers come only from the result files; nothing is copied by hand. The
# report learns what each file is from a manifest the workflow writes (rule
# report_manifest), never from a file's name.


localrules:
    report_manifest,
    report,
    ablations,


rule report_manifest:
    output:
        results_path(layout.REPORT_MANIFEST),
    log:
        results_path("logs/report_manifest.log"),
    params:
        manifest=report_manifest(),  # a change of the grid rewrites it (params trigger)
    run:
        write_report_manifest(params.manifest, output[0], log[0])


rule report:
    input:
        manifest=results_path(layout.REPORT_MANIFEST),
        results=report_inputs(),
    output:
        tables=[
            report(
                table_path(t, "csv"),
                caption=f"../workflow/report/{t}.rst",
                category="Tables",
            )
            for t in report_tables()
        ],
        tex=[table_path(t, "tex") for t in report_tables()],
        figures=[
            report(
                figure_path(f, "png"),
                caption=f"../workflow/report/{figure_caption(f)}.rst",
                category="Figures",
                labels={"figure": f},
            )
            for f in report_figures()
        ],
        pdfs=[figure_path(f, "pdf") for f in report_figures()],
    log:
        results_path("logs/report.log"),
    benchmark:
        results_path("benchmarks/report.tsv")
    conda:
        "../environment.yml"
    params:
        out=get_results_dir,
        code=code_hash("report"),
        loss_curves="--loss-curves" if LOSS_CURVES else "",
    shell:
        "python -m dpdm report --out {params.out:q} --manifest {input.manifest:q} {params.loss_curves} > {log:q} 2>&1"


# One ablation's table and figure, by its table's name (config ablations.<name>.table):
# `snakemake results/tables/table3.tex` builds exactly that ablation; rule ablations,
# every one.
rule ablation:
    input:
        get_ablation_inputs,
    output:
        tex=table_path("{table}", "tex"),
        csv=report(
            table_path("{table}", "csv"),
            caption="../workflow/report/ablation.rst",
            category="Ablations",
            labels={"ablation": "{table}"},
        ),
        pdf=figure_path("{table}", "pdf"),
        png=report(
            figure_path("{table}", "png"),
            caption="../workflow/report/ablation.rst",
            category="Ablations",
            labels={"ablation": "{table}", "kind": "figure"},
        ),
    log:
        results_path("logs/ablation_{table}.log"),
    benchmark:
        results_path("benchmarks/ablation_{table}.tsv")
    wildcard_constraints:
        table="|".join(map(re.escape, ABLATION_OF_TABLE)) or "(?!)",
    localrule: True
    conda:
        "../environment.yml"
    params:
        out=get_results_dir,
        manifest=get_ablation_manifest,
        code=code_hash("report-ablation"),
    shell:
        "python -m dpdm report-ablation --out {params.out:q} --manifest {params.manifest:q} > {log:q} 2>&1"


rule ablations:
    input:
        [p for name in GRID.ablations for p in ablation_outputs(name)],
