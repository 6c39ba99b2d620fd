"""Models: loading any transformers MoE (:mod:`.loading`), finding its MoE blocks from its modules
(:mod:`.discovery`), masking and removing experts (:mod:`.expert_surgery`), tiny models from any
config (:mod:`.tiny_configs`), the embedded model (:mod:`.tiny_moe`, its files under ``embedded/``),
the paper's DeepSeek-MoE without remote code (:mod:`.deepseek_moe`) and the conformance table of every
MoE type transformers ships (:mod:`.conformance`)."""

from moe_utils.moved import forwarding

# the old module moe_utils.models's names, for code written against it (moe_utils.moved)
__getattr__ = forwarding(__name__)
