"""bugscope: dissect a format-dependent bug in a language model with SAEs and attention-head patching."""
