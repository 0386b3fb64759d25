"""The pretrain stage: a tokenizer and a model trained from scratch."""
