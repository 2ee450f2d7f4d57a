"""The methods of ``python -m ace.bench quality`` (ace/bench/quality.py): the dual-tower baselines, the ACE
variants (run folder, RunConfig overrides, constrained decoding) and their table labels."""
from __future__ import annotations

from ace.bench.quality_hybrid import HYBRID_LABELS, HYBRID_VARIANTS

BASELINES = ("dt_zero_shot", "dt_doc_plus_queries", "dt_trained")
# querygen.num_queries (rewrites per item, over captions 1-3 in turn) is 9 = 3 per training caption unless given
# on the command line (e.g. querygen.num_queries=3: 1 per caption); the other keys are the variant's
PARAPHRASES = ["querygen.backend=paraphrase", "querygen.runtime=llama_cpp", "querygen.keep_captions=true",
               "querygen.batch_size=64"]
PARAPHRASES_PER_ITEM = 9
ACE_VARIANTS = {  # method -> (run folder, RunConfig overrides, constrained decoding)
    # the recipe of configs/bench_proxy.yaml (since issue 19: levers 1 + 3, R-Drop off) and its ablations
    "ace": ("ace", [], True),
    "ace_no_cbs": ("ace", [], False),
    "ace_int8": ("ace", [], True),
    "ace_kl": ("ace_kl", ["training.omega=0.15"], True),  # the paper's R-Drop weight
    "ace_no_fusion": ("ace_no_fusion", ["model.fusion=false"], True),
    "ace_no_kmeans": ("ace_no_kmeans", ["identifiers.use_kmeans=false"], True),
    "ace_no_rqvae": ("ace_no_rqvae", ["identifiers.quantizer=kmeans"], True),
    # the recipe before issue 19 (identifiers from the item embedding, no prototype heads, R-Drop 0.15)
    "ace_recipe_v1": ("ace_recipe_v1", ["identifiers.vectors=item", "model.prototype_levels=0", "training.omega=0.15"],
                      True),
    # issue 19 levers, each alone and together, named explicitly (lever 1: query-aware identifiers; 3: prototype heads)
    "ace_qid": ("ace_qid", ["identifiers.vectors=item_plus_queries", "model.prototype_levels=0"], True),
    "ace_proto": ("ace_proto", ["identifiers.vectors=item", "model.prototype_levels=2"], True),
    "ace_qid_proto": ("ace_qid_proto", ["identifiers.vectors=item_plus_queries", "model.prototype_levels=2"], True),
    # + lever 2 (query volume): the 3 training captions kept, 3 SmolLM2 paraphrases of each added (llama.cpp runtime)
    "ace_qid_proto_para": ("ace_qid_proto_para", ["identifiers.vectors=item_plus_queries", "model.prototype_levels=2",
                                                  *PARAPHRASES], True),
}
INT8_VARIANTS = {"ace_int8"}  # decoded with the dynamic-int8 model (CPU), as `serve.py --quantize` serves it
for _m in HYBRID_VARIANTS:  # the hybrid operating point (ace/bench/quality_hybrid.py): a trained variant re-scored
    ACE_VARIANTS[_m] = ACE_VARIANTS[_m.split("_hybrid")[0]]
METHODS = BASELINES + tuple(ACE_VARIANTS)
NEEDS_LLAMA = ("ace_qid_proto_para", "ace_qid_proto_para_hybrid")  # the optional extra ace[llama]: asked for by name
DEFAULT_METHODS = tuple(m for m in METHODS if m not in NEEDS_LLAMA)
LABELS = {"dt_zero_shot": "DT zero-shot", "dt_doc_plus_queries": "DT document+queries",
          "dt_trained": "DT trained (query tower)", "ace": "ACE (full)",
          "ace_no_cbs": "ACE w/o constrained beam search", "ace_int8": "ACE (full), dynamic int8 (CPU)",
          "ace_kl": "ACE with the R-Drop KL loss (omega=0.15)", "ace_recipe_v1": "ACE recipe before issue 19 (no levers)",
          "ace_no_fusion": "ACE w/o fusion", "ace_no_kmeans": "ACE w/o K-Means token (RQ-VAE only)",
          "ace_no_rqvae": "ACE w/o RQ-VAE tokens (hierarchical K-Means)",
          "ace_qid": "ACE, identifiers from document+queries vectors (lever 1)",
          "ace_proto": "ACE, prototype-aware heads on k and v1 (lever 3)",
          "ace_qid_proto": "ACE, levers 1 + 3", "ace_qid_proto_para": "ACE, levers 1 + 3 + paraphrases (lever 2)",
          **HYBRID_LABELS}
