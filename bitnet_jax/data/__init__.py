"""Data: corpora, documents, tokenizers and the grain pipeline that feeds training.

`sources` (corpus specs: stdlib, text, jsonl, parquet, array_record), `documents` (reading and
splitting them), `tokenizer` (sentencepiece and Hugging Face tokenizers), `token_records`
(tokenized corpora on disk), `pipeline` (packed, shuffled, checkpointable batches).
"""
