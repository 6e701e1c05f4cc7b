"""The data layer: tokenizers, text corpora, pre-tokenised shards and batch sources for training.

* tokenizer.py: :class:`ByteTokenizer` (default), :class:`HFTokenizer` (a ``tokenizer.json``), :func:`load_tokenizer`
* corpus.py: text files as byte tensors (:func:`load_corpus`, :func:`get_batch`)
* shards.py: :func:`prepare_corpus` writes token shards; :class:`TokenData` reads them
* samplers.py: the :class:`BatchSource` protocol, :class:`RandomWindows`, :class:`SequentialWindows`
"""
from .corpus import get_batch, load_corpus, stdlib_files, text_files
from .samplers import IGNORE_INDEX, BatchSource, RandomWindows, SequentialWindows, document_bounds
from .shards import TokenData, prepare_corpus
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer", "stdlib_files", "text_files", "load_corpus",
           "get_batch", "prepare_corpus", "TokenData", "BatchSource", "RandomWindows", "SequentialWindows",
           "IGNORE_INDEX", "document_bounds"]
