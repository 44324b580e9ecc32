"""The accuracy suite's cohorts: structurally different latent-trait generators (README,
"Accuracy suite"). They were fixed before any method was tuned on them: they are for finding
where methods lose, never to be adjusted until a method wins.
"""

from __future__ import annotations

from bidistill.synthetic.classes import ClassSpec
from bidistill.synthetic.latent import DEFAULT_CLINICAL, ClinicalFeature, LatentSpec

_LYMPHOVASCULAR = ClinicalFeature("lymphovascular", "binary", "label", 0.9, cuts=(0.8,))
_RECEPTOR = ClinicalFeature("receptor", "binary", "z")

SUITE: dict[str, LatentSpec] = {
    spec.name: spec
    for spec in (
        LatentSpec(
            "sparse-partial",
            "Key instances show the slide trait; a faint marker trace of the clinical trait. "
            "BCNB-like: 1,000 patients, 35% positive.",
            patients=1000,
            dim=32,
            instances=(20, 100),
            prevalence=0.35,
            blank_rate=0.06,
        ),
        LatentSpec(
            "diffuse-partial",
            "Every instance shifts with the slide trait and, weakly, with the clinical trait; "
            "small bags, a large balanced cohort.",
            patients=3000,
            dim=16,
            instances=(8, 24),
            prevalence=0.5,
            w_signal="diffuse",
            diffuse_w=0.5,
            c_trace="diffuse",
            diffuse_c=0.15,
            blank_rate=0.0,
            no_clinical_share=0.02,
        ),
        LatentSpec(
            "slides-blind",
            "The slides show nothing of the clinical trait; strong clinical signal, 20% "
            "positive, 64-d features, 10% blank cells.",
            patients=600,
            dim=64,
            instances=(30, 120),
            prevalence=0.2,
            beta_c=1.6,
            c_trace="none",
            blank_rate=0.10,
        ),
        LatentSpec(
            "slides-see-all",
            "A clear marker trace: the slides carry nearly all of the clinical signal; a "
            "small cohort of 300 patients.",
            patients=300,
            dim=32,
            instances=(40, 120),
            prevalence=0.5,
            marker_slope=2.5,
            marker_offset=-1.0,
            marker_shift=1.5,
        ),
        LatentSpec(
            "train-missing",
            "40% of the training patients lack clinical data, 20% of the cells are blank, and "
            "one clinical column depends on the label directly.",
            patients=1500,
            dim=48,
            instances=(10, 60),
            prevalence=0.3,
            clinical=(*DEFAULT_CLINICAL, _LYMPHOVASCULAR),
            blank_rate=0.2,
            train_no_clinical_share=0.4,
        ),
        LatentSpec(
            "subtype-interaction",
            "A recorded subtype changes how much the slide trait matters and leaves a diffuse "
            "trace in the slides; bag sizes from 5 to 60.",
            patients=2000,
            dim=24,
            instances=(5, 60),
            prevalence=0.4,
            beta_z=0.5,
            interaction=0.6,
            z_share=0.4,
            diffuse_z=0.3,
            clinical=(*DEFAULT_CLINICAL, _RECEPTOR),
        ),
    )
}

# A K-class cohort (``synthetic.classes``), run on request (`--generators three-class`): the
# three ALN classes' shape, key instances whose number tells the classes apart.
CLASS_SUITE: dict[str, ClassSpec] = {"three-class": ClassSpec()}
