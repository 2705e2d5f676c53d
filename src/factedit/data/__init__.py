"""Edit datasets: readers for the published benchmarks and factedit's own built-in facts.

Benchmark files (CounterFact, zsRE, KnowEdit, MQuAKE, ELKEN) are not shipped: `load_dataset` reads
them by name from a data folder (`data_dir=` or $FACTEDIT_DATA) or from any JSON file path,
sniffing the format from its keys. `builtin_facts()` returns the small fact set that ships
with the package (facts.json), checked against the built-in SmolLM2-135M.
"""

from .readers import (
    DATA_ENV,
    DATASETS,
    DataNotFoundError,
    builtin_facts,
    load_dataset,
    read_convsent,
    read_counterfact,
    read_counterfact_rome,
    read_elken,
    read_factedit,
    read_knowedit,
    read_mquake,
    read_wiki_counterfact,
    read_wiki_recent,
    read_wikibio,
    read_zsre,
    read_zsre_knowedit,
    resolve_data_dir,
    sniff_format,
)

__all__ = [
    "DATA_ENV",
    "DATASETS",
    "DataNotFoundError",
    "builtin_facts",
    "load_dataset",
    "read_convsent",
    "read_counterfact",
    "read_counterfact_rome",
    "read_elken",
    "read_factedit",
    "read_knowedit",
    "read_mquake",
    "read_wiki_counterfact",
    "read_wiki_recent",
    "read_wikibio",
    "read_zsre",
    "read_zsre_knowedit",
    "resolve_data_dir",
    "sniff_format",
]
