"""An offline demo cohort: small pyramidal TIFF slides built from real tissue pixels, with planted lesions.

Every slide is a pyramidal, JPEG-tiled TIFF at 0.5 µm/px (``wsimil_core.wsi.writer.write_pyramid_tiff``). Its
tissue is scikit-image's bundled immunohistochemistry image (``skimage.data.immunohistochemistry()``, a real
IHC-stained colon section), cut into randomly flipped/rotated blocks and laid out inside 1-3 irregular tissue
blobs on a white background. Three kinds of region are planted inside the tissue, each made from the same real
pixels re-stained in HED colour space (``skimage.color.rgb2hed``):

* ``lesion`` (defines ``label``): hematoxylin-dense, blue-purple tissue crowded with dark nuclei;
* ``pattern_b`` (defines ``task_b``): DAB-saturated dark-brown tissue with brown granules;
* ``pattern_c`` (defines ``task_c``): pale pink, eosin-rich tissue full of round white vacuoles.

Regions are large (lesions: radius 1.6-2.4 patches of 256 px at 0.5 µm/px; others >= 1.1), so patches lie wholly
inside them, and
their colours differ enough that even a random-init CNN's features separate them. The outline of each region is
written as GeoJSON in level-0 pixel coordinates (``<slide_id>.lesions.geojson``); ``lesion_fraction`` turns it into
a per-patch "fraction inside" for tests such as "attention inside lesions > outside".

Files: ``<slide_id>.tiff``, ``<slide_id>.lesions.geojson``, ``labels.csv`` (slide_id, label, task_b, task_c,
patient_id), ``omics.csv`` (slide_id + 200 gene-like columns; ``GENE001..GENE020`` go up with ``label``,
``GENE021..GENE030`` with ``task_b``), ``cohort.json`` (parameters) and ``README.txt``.
Everything is deterministic for a seed.

Modules: ``params`` (``DemoParams``, ``DemoCohort``, ``REGION_KINDS``), ``slides`` (painting one slide),
``cohort`` (``make_demo_cohort``) and ``lesions`` (``load_lesions``, ``lesion_fraction``).
"""

from wsimil_core.demo.cohort import make_demo_cohort
from wsimil_core.demo.lesions import lesion_fraction, load_lesions
from wsimil_core.demo.params import REGION_KINDS, DemoCohort, DemoParams

__all__ = ["DemoParams", "DemoCohort", "make_demo_cohort", "lesion_fraction", "load_lesions", "REGION_KINDS"]
