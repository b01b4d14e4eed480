"""What `jaxvae score` writes for one scan: its maps as NIfTI files on the input's grid, and
optionally an overview figure, all or nothing (the maps themselves: jaxvae.inference.volumes)."""

from pathlib import Path

import numpy as np

from jaxvae.base.io import all_or_nothing, confined, refuse_existing
from jaxvae.data import nifti
from jaxvae.inference import volumes
from jaxvae.report.figures import map_figure


def score_volume(model, params, path, out_dir, *, beta=1.0, mask=None, settings=None,
                 overwrite=False, png=False, volume_index=None, preprocess=None,
                 segmenter=None, modality=None) -> list[Path]:
    """Anomaly maps of one NIfTI volume, written as NIfTI maps on the input's grid.

    Args:
      model, params, beta: the trained model.
      path: input volume (.nii / .nii.gz); for a model of C sequences (`in_channels`), C
        co-registered volumes in the run's order (a tuple or list, as `find_inputs` gives
        them) or a case folder holding each sequence (with `modality`): the maps are on
        the first one's grid, `<stem>` is the case (the folder's name, or the first file's
        without its `_<sequence>` suffix).
      out_dir: output folder; files are `<stem>_<predictor>.nii.gz` (float32), with a
        segmenter `<stem>_prob.nii.gz` (float32 lesion probability) and
        `<stem>_mask.nii.gz` (uint8 0/1), + `<stem>_maps.png`: the arrays of `volume_maps`.
      mask: optional brain mask file on the same grid.
      settings: EvalSettings (predictors, smoothing, projection steps...); None: as in
        `volume_maps`.
      overwrite: replace existing outputs.
      png: also write an overlay figure of the slices with the highest map values.
      preprocess: the run's PreprocessParams (None: the defaults at the model's image size);
        its size must be the model's `image_size`.
      segmenter: a `segment.Segmenter` (or its dict), e.g. `segment.load(run_dir)`; None:
        maps only.
      modality: the run's sequences ("flair,t2"): needed for a case folder; checked
        against the file names where given.

    Returns:
      The paths written. Every map is computed before the first file is written, each file
      is written atomically, and an error while writing removes the maps already written.

    Raises:
      ConfigError: the settings differ from the segmenter's, or the input's sequences or
        the pre-processing's size from the model's (before any work).
      OutputError: an output exists and overwrite is False (before any work).
    """
    segmenter = volumes.as_segmenter(segmenter)
    settings = volumes.settings_for(settings, segmenter)
    out_dir = Path(out_dir)
    sources, _, stem = volumes.case_inputs(path, modality, getattr(model, "in_channels", 1))
    preprocess = volumes.preprocess_for(preprocess, model)
    names = [*settings.predictors, *(("prob", "mask") if segmenter else ())]
    targets = {p: confined(out_dir, f"{stem}_{p}.nii.gz") for p in names}
    png_target = confined(out_dir, f"{stem}_maps.png") if png else None
    outputs = [*targets.values(), *([png_target] if png else [])]
    refuse_existing(outputs, overwrite=overwrite)  # before any work, not after minutes
    loaded = nifti.load_volumes(sources, volume_index=volume_index)
    volume = loaded[0]
    native, images, maps = volumes.maps_on_grid(model, params, loaded, beta=beta,
                                                settings=settings, preprocess=preprocess,
                                                mask=mask, segmenter=segmenter)
    written = []
    with all_or_nothing(outputs):  # all maps of the volume, or none of them
        for name, target in targets.items():
            written.append(nifti.save_volume(target, native[name], volume.affine,
                                             overwrite=overwrite, dtype=native[name].dtype))
        if png:
            score = sum(m / max(float(m.max()), 1e-12) for m in maps.values())
            order = np.argsort(-score.reshape(len(score), -1).max(1))[:4]
            map_figure(png_target, images, None, maps,
                       index=sorted(order.tolist()), overwrite=overwrite,
                       title=stem if len(sources) > 1 else str(Path(path).name))
            written.append(png_target)
    return written
