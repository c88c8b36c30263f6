"""model: the seq2seq model (single-device code; tensor parallelism from megatron-core layers).

megatron-core is imported only inside this package (tests/test_import_graph.py checks it), so this is the one
place its import-time noise is handled: megatron-core 0.16 warns "Transformer Engine and Apex are not installed"
from four of its modules in every process that imports it. We use neither (our layers are megatron-core's local
implementations and torch's optimizers), so the warning says nothing and buried the output of every command (8 of
the 13 lines `generate` printed). Only that message is ignored; every other warning still shows.
"""
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
