# Stage 6 (optional, config audit.cells): one-run privacy audits (Steinke, Nasr &
# Jagielski 2023) of the audited cells' DP-SGD mechanisms with gradient canaries
# (dpdm/audit.py), and their table and figure. An audit whose empirical lower bound
# exceeds the accountant's epsilon FAILS its job: the mechanism or its accounting is
# broken. Audits write under {dataset}/eps{eps}/audit/, never into a cell.


localrules:
    audit_report,
    audit,


rule audit_cell:
    input:
        train=data_path("{dataset}/train.npz"),  # its meta.json gives N, the training set's size
    output:
        results_path(layout.AUDIT),
    log:
        audit_path("logs/audit.log"),
    benchmark:
        audit_path("benchmarks/audit.tsv")
    conda:
        "../environment.yml"
    threads: 1
    resources:
        **rule_resources("default"),
    params:
        data=get_data_dir,
        settings=audit_settings,
        options=audit_options(),
        code=code_hash("audit"),
    shell:
        "python -m dpdm audit --settings {params.settings:q} --data {params.data:q} --out {output:q}"
        " {params.options} > {log:q} 2>&1"


rule audit_report:
    input:
        audit_files(),
    output:
        tex=table_path(layout.AUDIT_TABLE, "tex"),
        csv=report(
            table_path(layout.AUDIT_TABLE, "csv"),
            caption="../workflow/report/audit.rst",
            category="Privacy audit",
        ),
        pdf=figure_path(layout.AUDIT_TABLE, "pdf"),
        png=report(
            figure_path(layout.AUDIT_TABLE, "png"),
            caption="../workflow/report/audit.rst",
            category="Privacy audit",
        ),
    log:
        results_path("logs/audit_report.log"),
    conda:
        "../environment.yml"
    params:
        out=get_results_dir,
        code=code_hash("report-audit"),
    shell:
        "python -m dpdm report-audit --out {params.out:q} {input:q} > {log:q} 2>&1"


rule audit:
    input:
        audit_outputs(),
