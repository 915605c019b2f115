"""Logical axis names, in one place.

Parameters and large activations are annotated with these names; the mapping
from names to mesh axes is data (`DEFAULT_RULES`, overridable by the config's
`logical_axis_rules`), so sharding a model never needs a model change.
"""

# Weights.
EMBED = 'embed'          # model width D
MLP = 'mlp'              # MLP hidden
HEADS = 'heads'          # attention heads K
HEAD_DIM = 'kv'          # per-head width Dh
LAYERS = 'layers'        # stacked layer axis of scanned blocks
PATCH = 'patch'          # flattened tubelet pt*ph*pw*C
MODULATION = 'modulation'  # adaLN shift/scale/gate outputs (k * D)
CLASSES = 'classes'      # label-embedding rows
FREQ = 'freq'            # sinusoidal timestep features
LORA_RANK = 'lora_rank'  # rank r of LoRA adapter factors (model/lora.py)

# Activations.
ACT_BATCH = 'activation_batch'
ACT_LENGTH = 'activation_length'
ACT_EMBED = 'activation_embed'
ACT_HEADS = 'activation_heads'
ACT_KV = 'activation_kv'
ACT_MLP = 'activation_mlp'

# Mesh axes.
MESH_AXES = ('data', 'fsdp', 'tensor', 'sequence')

DEFAULT_RULES = (
    (ACT_BATCH, ('data', 'fsdp')),
    (ACT_LENGTH, 'sequence'),
    (ACT_EMBED, None),
    (ACT_HEADS, 'tensor'),
    (ACT_KV, None),
    (ACT_MLP, 'tensor'),
    (EMBED, 'fsdp'),
    (MLP, 'tensor'),
    (HEADS, 'tensor'),
    (HEAD_DIM, None),
    (LAYERS, None),
    (PATCH, None),
    (MODULATION, None),
    (CLASSES, None),
    (FREQ, None),
    (LORA_RANK, None),
)
