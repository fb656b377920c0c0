# The workflow lives in workflow/Snakefile (the layout the Snakemake workflow catalog expects).
include: "workflow/Snakefile"


# Snakemake takes its default target from the first rule of the file it was started with, never
# from an included one: this rule makes `snakemake --cores all` here build everything.
rule default:
    localrule: True
    input:
        rules.all.input,
