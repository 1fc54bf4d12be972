"""Entry point: ``python -m antidote_pl {fit,validate,test,predict,pipeline,tokenizer} --config a.yaml``."""

import os

# Fast tokenizers warn (and may deadlock) when forked by DataLoader workers after use.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from antidote_pl.stages.cli import main

if __name__ == "__main__":
    main()
