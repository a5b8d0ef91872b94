"""The tiny model and training run of the end-to-end tests, declared once: test_train.py,
test_train_data.py, test_ablate.py, test_kill_resume.py and sharded_runs.py train it, each
adding only the settings its check needs.

Sharing the settings also shares the compiled programs: the suite's persistent compilation cache
(conftest.py) compiles a train step once for all the runs that have the same model, batch shape and
schedule, and at this size compiling is most of a run's time.
"""

# A few real stdlib modules: a corpus big enough for a 640-piece tokenizer and tiny batches.
CORPUS_FILES = [
    "textwrap.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "bisect.py",
    "heapq.py",
    "colorsys.py",
    "keyword.py",
    "linecache.py",
    "queue.py",
    "sched.py",
    "this.py",
    "tabnanny.py",
    "calendar.py",
]

# Two layers, 4 query heads and 2 KV heads of 16 (grouped-query attention): a real BitNet block
# that compiles in seconds, with every size divisible by 8, so the sharded tests split it over 8
# devices too.
MODEL = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
]

# Trained by the CLI on a 640-piece tokenizer of CORPUS_FILES, 32 tokens per row. 6 steps at a
# high rate (1e-2) lower the eval loss; eval and checkpoints every 3 steps, so that a run can be
# cut after step 3 and resumed.
RUN = [
    *MODEL,
    "model.vocab_size=640",
    "model.max_position_embeddings=64",
    "seq_len=32",
    "batch_size=4",
    "steps=6",
    "warmup_steps=2",
    "log_every=1",
    "eval_every=3",
    "eval_batches=2",
    "checkpoint_every=3",
    "keep_checkpoints=3",
    "heldout_fraction=0.1",
    "learning_rate=1e-2",
]
