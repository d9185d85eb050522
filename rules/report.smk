# Stage 5: every result JSON -> LaTeX/CSV tables and matplotlib figures.
# Numbers come only from the result files; nothing is copied by hand.


localrules:
    report,


rule report:
    input:
        results=report_json_inputs(),
        grids=[p for p in all_cell_outputs() if p.endswith(".png")],
    output:
        tables=[
            report(
                f"{RESULTS}/tables/{t}.csv",
                caption=f"../workflow/report/{t}.rst",
                category="Tables",
            )
            for t in report_tables()
        ],
        tex=[f"{RESULTS}/tables/{t}.tex" for t in report_tables()],
        figures=[
            report(
                f"{RESULTS}/figures/{f}.png",
                caption="../workflow/report/figure.rst",
                category="Figures",
                labels={"figure": f},
            )
            for f in report_figures()
        ],
        pdfs=[f"{RESULTS}/figures/{f}.pdf" for f in report_figures()],
    params:
        code=code_hash("report"),
    log:
        RESULTS + "/logs/report.log",
    benchmark:
        RESULTS + "/benchmarks/report.tsv"
    shell:
        "python -m dpdm report --out {RESULTS} {input.results:q} > {log:q} 2>&1"
