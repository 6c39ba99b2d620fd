"""Capture (paper section 1): routing read from a model's own blocks (:mod:`.routing`), the routing
store on disk (:mod:`.store`), and the tokens' text and classes (:mod:`.token_text`)."""
