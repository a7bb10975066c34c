"""Stage 2 of an evaluation, the concepts: what to personalize and with which prompts.

A concept set is a typed variant of :class:`evaluation.concepts.base.ConceptSet` chosen by ``class_path`` in the
``concepts:`` section and loads itself: :class:`~evaluation.concepts.synthetic.SyntheticConcepts` (offline
default), :class:`~evaluation.concepts.dreambench.DreamBenchConcepts`, or one from outside the core such as
``toyworld.ToyWorldConcepts``.
"""
