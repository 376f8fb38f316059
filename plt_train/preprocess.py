"""``plt-preprocess`` entry point: text files -> megatron indexed dataset (see data/preprocess)."""
from plt_train.data.preprocess import main

if __name__ == "__main__":
    main()
