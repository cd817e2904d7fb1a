"""Offline test-bed: a small Llama trained from scratch on synthetic e-mail that memorized private records."""

from depn_serve.testbed.build import (
    CorpusSize,
    Memorization,
    ModelSize,
    TestbedInfo,
    TrainingStats,
    build_testbed,
    load_testbed_info,
)
from depn_serve.testbed.corpus import Corpus, generate_corpus
from depn_serve.testbed.profiles import PROFILES, ProfileName, ProfileSpec, profile_spec
from depn_serve.testbed.tokenizer import train_tokenizer

__all__ = [
    "PROFILES",
    "Corpus",
    "CorpusSize",
    "Memorization",
    "ModelSize",
    "ProfileName",
    "ProfileSpec",
    "TestbedInfo",
    "TrainingStats",
    "build_testbed",
    "generate_corpus",
    "load_testbed_info",
    "profile_spec",
    "train_tokenizer",
]
