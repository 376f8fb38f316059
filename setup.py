from setuptools import find_packages, setup

setup(
    name="plt_train",
    version="0.1.0",
    description="Distributed pretraining for Parallel Loop Transformers and BigMac MoE "
                "on megatron-core",
    python_requires=">=3.11",
    # The Hydra presets stay in the top-level configs/ of the repository and ship inside the
    # package as plt_train/configs (plt_train.config.store.config_dir finds either).
    packages=find_packages(include=["plt_train", "plt_train.*"]) + ["plt_train.configs"],
    package_dir={"plt_train.configs": "configs"},
    package_data={"plt_train.configs": ["*.yaml", "*/*.yaml"],
                  # the lm-eval tasks that ship with plt_train (plt_train/evaluation/tasks.py)
                  "plt_train.evaluation": ["tasks/*.yaml", "tasks/*.jsonl"]},
    # Install torch first, pinned (a bare `torch` requirement pulls a multi-GB CUDA build on
    # CPU machines): `pip install torch==2.13.0` then `pip install -e .`.
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",  # newest release for Python 3.11
        # Exactly 1.3.8: hydra-submitit-launcher asks for hydra-core>=1.1.0.dev7, a pre-release
        # specifier that would otherwise let pip pick a 1.4 pre-release.
        "hydra-core==1.3.8",
        "omegaconf>=2.3,<2.4",
        "numpy",
        "psutil",  # needed by dist_checkpointing's async writer, undeclared by megatron-core
        "tokenizers>=0.20",
        "wandb>=0.19",
        "tqdm",
        "safetensors",  # plt-export writes Hugging Face checkpoints
        "pyarrow",  # plt-preprocess reads Parquet and Hugging Face datasets folders
        "zstandard",  # plt-preprocess reads .jsonl.zst
    ],
    extras_require={
        # triton: the kernel tests run each Triton kernel through its CPU interpreter (about
        # 1 GB installed, so only here; CUDA builds of torch bring their own).
        # transformers: the export tests load the exported model with it.
        # lm-eval: plt-eval and the in-training downstream evaluation (plt_train/evaluation).
        "dev": ["pytest>=8", "matplotlib", "hydra-submitit-launcher==1.2.0", "submitit==1.5.4",
                "triton>=3.6", "transformers>=4.46", "lm_eval>=0.4.13,<0.5"],
        # lm-evaluation-harness: its TemplateLM API is what PltLM implements (0.4.x).
        "eval": ["lm_eval>=0.4.13,<0.5"],
        # Hydra sweeps submitted to Slurm (hydra/launcher=submitit_slurm).
        "slurm": ["hydra-submitit-launcher==1.2.0", "submitit==1.5.4"],
        # Transformer Engine builds against CUDA: GPU machines only. apex is used when present
        # but is not on PyPI, so it is never required.
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "plt-train=plt_train.train:main",
            "plt-preprocess=plt_train.preprocess:main",
            "plt-dryrun=plt_train.dryrun:main",
            "plt-generate=plt_train.generate:main",
            "plt-export=plt_train.export:main",
            "plt-eval=plt_train.evaluate:main",
        ],
    },
)
