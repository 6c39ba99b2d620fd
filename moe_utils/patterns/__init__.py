"""Collaboration patterns: the expert matrix X and co-activation (:mod:`.expert_matrix`,
:mod:`.cooccurrence`), HSDL (paper section 3, :mod:`.hsdl`), atoms, hierarchy and coverage
(:mod:`.atoms`), their controls against token identity and chance (:mod:`.token_null`,
:mod:`.hsdl_controls`, :mod:`.stratified`, figures in :mod:`.null_plots`) and the annotation of
patterns and domains (:mod:`.annotation`, :mod:`.domain_intervals`)."""

from moe_utils.moved import forwarding

# the old module moe_utils.patterns's names, for code written against it (moe_utils.moved)
__getattr__ = forwarding(__name__)
