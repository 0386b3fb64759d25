"""Commented `llmcycle.yaml` templates written by `llmcycle init DIR --task TASK`."""
from __future__ import annotations

# Per task: the use case, the data fields, the headline metric and a model that suits it.
TASK_DEFAULTS = {
    "summarization": dict(use_case="Summarize a dialogue in one or two sentences.",
                          input="dialogue", target="summary", metric="rougeL", threshold=0.35,
                          model="google/flan-t5-base", arch="t5"),
    "qa": dict(use_case="Answer a question from the given context.", input="question",
               target="answer", metric="f1", threshold=0.6, model="google/flan-t5-base", arch="t5"),
    "classification": dict(use_case="Label each text with one of a fixed set of classes.",
                           input="text", target="label", metric="macro_f1", threshold=0.8,
                           model="google/flan-t5-base", arch="t5"),
    "generation": dict(use_case="Continue or answer a prompt in free text.", input="prompt",
                       target="response", metric="rougeL", threshold=0.3,
                       model="HuggingFaceTB/SmolLM2-135M-Instruct", arch="gpt"),
}

TEMPLATE = """\
# llmcycle project file: one file drives the whole lifecycle
#   scope -> select or pretrain a model -> adapt and align -> evaluate -> optimize -> deploy -> augment
# Every section is optional. `llmcycle run` carries the project through each configured stage;
# each variant of a stage becomes a run in ./runs, compared side by side with `llmcycle runs compare`.
# Any key can be overridden on the command line with its dotted path, e.g.
#   llmcycle run --set pretrain.tiny.lr=5e-4 --set data.seed=1

project:
  name: {name}                 # a name for the use case
  task: {task}                 # summarization | qa | classification | generation

scope:
  use_case: "{use_case}"
  success_metric: {metric}          # the headline metric that decides success
  success_threshold: {threshold}       # value of the metric that counts as success
  latency_budget_ms: 500           # p95 latency a deployment may take
  size_budget_mb: 1000             # largest model size on disk allowed
  throughput_tflops: 1.0           # sustained training TFLOP/s to plan time with (CPU core ~0.05)
  tune_epochs: 3                   # epochs assumed when planning fine-tuning
  lora_r: 8                        # LoRA rank assumed when planning LoRA memory

data:
  train: data/train.jsonl          # JSONL, CSV, Parquet, a save_to_disk folder, or hf:NAME[:CONFIG][:SPLIT]
  # eval: data/eval.jsonl          # without it, a seeded split of train is held out for evaluation
  input: {input}                # field with the model input
  target: {target}                # field with the reference; a list of fields = several references
  eval_fraction: 0.1               # share of train held out when no eval file is given
  seed: 42                         # seed of that split

model:
  name: {model}   # a Hub id, a local folder, or run:pretrain/VARIANT (a model pretrained here)
  dtype: auto                      # auto | float32 | bfloat16 | float16
  device: auto                     # auto | cpu | cuda | mps
  # context_window: 512            # override the context window the model's config states

evaluate:                          # how every evaluation prompts and generates
  template: "{template}"
  generation:
    max_new_tokens: 64             # most tokens generated per example
    batch_size: 16                 # prompts per batch (sorted by length, so little padding)
    # num_beams: 1                 # beam search when > 1
    # repetition_penalty: 1.0
    # no_repeat_ngram_size: 3      # never repeat a 3-gram (usual for summaries)
  # limit: 500                     # evaluate on the first N eval examples only
  perplexity: true                 # also the perplexity of the references
  show_examples: 3                 # examples shown side by side in comparisons

prompt:                            # the prompt-first baseline: do we even need to fine-tune?
  templates:                       # every template x shots x selection x generation is one run
    default: "{template}"
  shots: [0, 1, 3]                 # zero-, one- and few-shot
  selection: [first, similar]      # first | random (seeded) | similar (sentence embedding)
  shot_format: "{{prompt}} {{target}}"  # how a solved example is written into the prompt
  on_overflow: drop_shots          # drop_shots (counted in the run) | refuse; text is never cut
  generation:
    greedy: {{max_new_tokens: 64}}
    sampled: {{do_sample: true, temperature: 0.7, top_k: 50, top_p: 0.95, max_new_tokens: 64}}
  limit: 200

# Select a base model by measuring candidates on your data; then set model.name: run:select/best.
# select:
#   candidates:                    # each is a run select/NAME: scored, sized, timed, checked against budgets
#     hub: {{model: {model}}}      # a Hub id or a local folder
#     minilm:                      # a warm-started encoder-decoder from a pretrained BERT-style encoder
#       warm_start: {{encoder: all-MiniLM-L6-v2, decoder_layers: 2}}   # offline with llmcycle[embeddings]
#     # scratch: {{run: pretrain/tiny}}   # a model pretrained below
#   probe: {{method: full, steps: 100, lr: 3e-4, batch_size: 16}}  # the same short fine-tune for each
#   # pick: minilm                 # choose this one whatever the scores say

# Train your own base model from scratch instead of selecting one: uncomment, then point
# model.name at run:pretrain/tiny. Each named entry is a variant and becomes its own run.
# pretrain:
#   tiny:
#     architecture: {arch}               # t5 (encoder-decoder) | gpt (decoder-only)
#     size: tiny                   # tiny | small (t5-small / gpt2 sized) | base; or set dims below
#     # d_model: 128               # explicit dimensions override the preset
#     # n_layers: 2
#     # n_heads: 4
#     # d_ff: 512
#     vocab_size: 4000             # tokenizer vocabulary trained on the project's data
#     seq_len: 256                 # tokens per training sequence
#     packing: true                # pack documents into full sequences: no compute spent on padding
#     batch_size: 16
#     lr: 1e-3
#     warmup_steps: 50
#     max_steps: 500               # or epochs: 1
#     checkpoint_every: 100        # resume with `llmcycle pretrain --resume`
#     seed: 0

# When prompts are not enough: fine-tune (each named entry is a variant and a run, evaluated).
# tune:
#   lora:
#     method: lora                 # full | lora | prompt_tuning (QLoRA: lora with bits: 4, GPU)
#     r: 16                        # LoRA rank; alpha scales the update by alpha / r
#     alpha: 32
#     # target_modules: [q, v]     # default by model type
#     lr: 1e-4
#     batch_size: 8
#     epochs: 1                    # or max_steps
#     eval_every: 100              # validation loss + headline metric; the best checkpoint is kept
#     checkpoint_every: 100        # resume with `llmcycle tune --resume`

# Align with preferences: train a reward model, then PPO against it (or DPO / ORPO on pairs).
# align:
#   toxicity:
#     method: reward_classifier    # reward_classifier | reward_pairwise | ppo | dpo | orpo
#     data: toxicity.csv           # labelled text
#     text_field: tweet
#     label_field: class
#     label_map: {{0: toxic, 1: toxic, 2: not_toxic}}
#     encoder: all-MiniLM-L6-v2    # ships offline with llmcycle[embeddings]
#     epochs: 1
#     lr: 5e-5
#   detox:
#     method: ppo
#     policy: run:tune/lora        # the model to align (an adapter is merged, then a new one trained)
#     reward: run:align/toxicity
#     reward_label: not_toxic      # reward = this label's logit
#     max_steps: 50                # PPO steps of batch_size prompts
#     batch_size: 16
#     mini_batch_size: 4
#     init_kl_coef: 0.2            # KL penalty against the starting model (adaptive_kl: true to adapt)
#     lr: 1.41e-5

# What `llmcycle serve` answers chat completions with besides the model (flags: --rag-index, --pal).
# augment:
#   rag:
#     index: index                 # built by `llmcycle index DOCS --index index`; answers cite it
#     k: 5                         # chunks retrieved; the lowest-ranked dropped whole to fit the window
#   pal:
#     enabled: true                # requests with {{"llmcycle": {{"mode": "pal"}}}} get a program, run
#     timeout_s: 5                 # in the sandbox, and its printed answer
"""


def render(task: str, name: str) -> str:
    from llmcycle.data.prompting import DEFAULT_TEMPLATES

    d = TASK_DEFAULTS[task]
    # the prompt goes into a double-quoted YAML string (newlines escaped), naming the input field
    prompt = DEFAULT_TEMPLATES[task].replace("\n", "\\n").replace("{input}", "{" + d["input"] + "}")
    return TEMPLATE.format(task=task, name=name, template=prompt, **d)
