# Stage 5: result files -> LaTeX/CSV tables and matplotlib figures: the paper's main
# tables (rule report) and one table + figure per ablation (rules ablation_<name>).
# Numbers come only from the result files; nothing is copied by hand.


localrules:
    report,


rule report:
    input:
        results=report_inputs(),
        grids=[p for p in main_outputs() if p.endswith(".png")],
    output:
        tables=[
            report(
                results_path(f"tables/{t}.csv"),
                caption=f"../workflow/report/{t}.rst",
                category="Tables",
            )
            for t in report_tables()
        ],
        tex=[results_path(f"tables/{t}.tex") for t in report_tables()],
        figures=[
            report(
                results_path(f"figures/{f}.png"),
                caption=f"../workflow/report/{figure_caption(f)}.rst",
                category="Figures",
                labels={"figure": f},
            )
            for f in report_figures()
        ],
        pdfs=[results_path(f"figures/{f}.pdf") for f in report_figures()],
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
        "python -m dpdm report --out {params.out:q} {params.loss_curves} {input.results:q} > {log:q} 2>&1"


# One rule per ablation, so that `snakemake ablation_<name>` builds exactly that table.
for _name in GRID.ablations:

    rule:
        name:
            f"ablation_{_name}"
        input:
            ablation_inputs(_name),
        output:
            tex=ablation_outputs(_name)["tex"],
            csv=report(
                ablation_outputs(_name)["csv"],
                caption="../workflow/report/ablation.rst",
                category="Ablations",
                labels={"ablation": _name},
            ),
            pdf=ablation_outputs(_name)["pdf"],
            png=report(
                ablation_outputs(_name)["png"],
                caption="../workflow/report/ablation.rst",
                category="Ablations",
                labels={"ablation": _name, "kind": "figure"},
            ),
        log:
            results_path(f"logs/ablation_{_name}.log"),
        benchmark:
            results_path(f"benchmarks/ablation_{_name}.tsv")
        localrule: True
        conda:
            "../environment.yml"
        params:
            out=get_results_dir,
            manifest=json.dumps(
                GRID.ablations[_name], sort_keys=True, separators=(",", ":")
            ),
            code=code_hash("report-ablation"),
        shell:
            "python -m dpdm report-ablation --out {params.out:q} --manifest {params.manifest:q} > {log:q} 2>&1"
