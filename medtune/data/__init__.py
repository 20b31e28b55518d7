"""Datasets, from where they live to checked training records; one module a step:

sources   read raw records (local files, cMedQA2 pairs, the Hub, ModelScope), each with its place (file:line)
formats   the format registry: one entry per dataset schema, raw record -> Examples
render    what the model's chat template does (its end-of-turn token, whether it keeps <think> blocks)
encode    records -> token ids and the prompt offset, one definition for prepare's checks and for training
options   PrepareOptions: prepare's flags, library keywords and config keys, and their checks
prepare   the stage: examples -> records in a style -> checked -> split -> train/valid/test JSONL + manifest
"""
