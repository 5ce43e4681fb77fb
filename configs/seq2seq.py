"""English->French translation with RNN encoder-decoders, attention decoders or a Transformer.

    python main.py --config configs/seq2seq.py --workdir workdirs/s2s_luong                # Luong general, bi-LSTM-128
    python main.py --config configs/seq2seq.py:model=none --workdir workdirs/s2s_none      # Keras lstm_seq2seq
    python main.py --config configs/seq2seq.py:model=bahdanau,sampling=linear --workdir workdirs/s2s_ss
    python main.py --config configs/seq2seq.py:model=transformer --workdir workdirs/s2s_tf
    python main.py --config configs/seq2seq.py:dataset=pairs:/data/fra.txt,level=word --workdir DIR

Models (`model=`):
  none          LSTM encoder-decoder, context = the encoder's final state (Keras lstm_seq2seq)
  bahdanau      additive attention on s_{t-1}
  luong         global attention with `score=` dot / general / concat, input feeding
  local         Luong local-p attention (D = `window`), input feeding; local_m: local-m
  transformer   pre-norm Transformer encoder-decoder
`cell=lstm|gru` and `encoder=uni|bi` (bi-directional, two directions of hidden/2: the default for the
attention models; `none` reads one direction) apply to the RNN models.  `layers=N` stacks N layers
(default 1 RNN layer, or 3 encoder and 3 decoder blocks); `hidden=N` is the RNN decoder's width or the
Transformer's model width.  `sampling=` none (teacher forcing), linear, exponential or inverse_sigmoid
(scheduled sampling, see vit_jax.train.tasks).

Data: `dataset=en_fr_generated` (default; the offline corpus of vit_jax.data.text, 12,000 pairs, a
10% held-out split with no source shared with training) or `pairs:/path/fra.txt` (the Tatoeba file).
Then translate: `python -m vit_jax.translate --workdir DIR < sentences.txt`.
"""

from __future__ import annotations

import ml_collections

from configs.common import durations, parse_arg

MODELS = ("none", "bahdanau", "luong", "local", "local_m", "transformer")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, model="luong", cell="lstm", layers=0, hidden=128, score="general", window=10,
                  encoder="", sampling="none", dataset="en_fr_generated", level="char", runlocal=False)
  if arg.model not in MODELS:
    raise ValueError(f"Unknown seq2seq model {arg.model!r}: choose one of {MODELS}.")
  encoder = arg.encoder or ("uni" if arg.model == "none" else "bi")
  if encoder not in ("uni", "bi"):
    raise ValueError(f"Unknown encoder {arg.encoder!r}: choose uni (one direction) or bi (bi-directional).")
  c = ml_collections.ConfigDict()
  c.task = "seq2seq"
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(name=arg.dataset, train_split="train", eval_split="test",
                                          pp_train="", pp_eval=""))
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.text = dict(level=arg.level, test_fraction=0.1, split_seed=0, limit=None, numbers=3000, dates=3000,
                     sentences=6000, corpus_seed=0, plain_spaces=True)
  if arg.runlocal:
    c.data.text.update(numbers=300, dates=300, sentences=600)
  durations(c, "total", "log", "eval", "checkpoint")
  c.mesh = (("data", -1),)
  # How mesh axes split across hosts, e.g. (("data", 2),): see vit_jax.train.sharding.make_mesh.
  c.mesh_dcn = ml_collections.config_dict.placeholder(tuple)
  c.num_devices = ml_collections.config_dict.placeholder(int)
  c.sharding_rules = ml_collections.config_dict.placeholder(tuple)
  c.fsdp_min_size = 2 ** 14
  c.accumulate = 1
  c.keep_checkpoints = 3
  c.keep_every_steps = ml_collections.config_dict.placeholder(int)
  c.ema_decay = 0.0
  c.label_smoothing = 0.0
  c.init = dict(path="")

  embed = None if arg.level == "char" else 256  # one-hot characters, learned word embeddings
  if arg.model == "transformer":
    c.model = dict(kind="transformer", hidden=arg.hidden, num_layers=arg.layers or 3, num_heads=4,
                   mlp_dim=4 * arg.hidden,
                   dropout_rate=0.1, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
    c.optim = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.98, weight_decay=0.01,
                                             clip_norm=1.0, scale_lr_by_batch=False, lr_mults=(), wd_mults=(),
                                             frozen=(), schedule=dict(decay="cosine", min_lr=1e-5)))
    c.label_smoothing = 0.1
  else:
    attention = {"local_m": "local"}.get(arg.model, arg.model)
    c.model = dict(kind="rnn", cell=arg.cell, hidden=arg.hidden, num_layers=arg.layers or 1,
                   bidirectional=encoder == "bi", merge="concat", attention=attention, score=arg.score,
                   window=arg.window, local_mode="m" if arg.model == "local_m" else "p", embed_dim=embed,
                   dropout_rate=0.2 if arg.layers > 1 else 0.0)
    if encoder == "bi":
      c.model.hidden = arg.hidden // 2  # two directions of hidden/2, concatenated: a decoder of `hidden`
    c.optim = ml_collections.ConfigDict(dict(name="adam", lr=3e-3, b1=0.9, b2=0.999, weight_decay=0.0,
                                             clip_norm=1.0, scale_lr_by_batch=False, lr_mults=(), wd_mults=(),
                                             frozen=(), schedule=dict(decay="cosine", min_lr=3e-5)))
  c.optim.layer_decay = ml_collections.config_dict.placeholder(float)
  durations(c.optim.schedule, "warmup")
  c.optim.schedule.warmup_steps = 100

  c.scheduled_sampling = dict(schedule=arg.sampling, k=0.999 if arg.sampling == "exponential" else 300.0,
                              decay_steps=3000, min_prob=0.5 if arg.sampling == "linear" else 0.0, prob=1.0)
  c.batch_size, c.eval_batch_size = 64, 200
  c.total_steps, c.log_steps, c.eval_steps, c.checkpoint_steps = 4000, 100, 1000, 500
  if arg.runlocal:
    c.total_steps, c.log_steps, c.eval_steps, c.checkpoint_steps = 200, 20, 100, 100
    c.eval_batch_size = 120
  return c
