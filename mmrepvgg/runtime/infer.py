"""``mmrepvgg-infer``: segment images, folders, lists and videos with an
exported model, writing mmseg's ``pred/`` label maps and ``vis/``
overlays.

Inputs are image files, folders of images (``--recursive`` for their
subfolders too), glob patterns, ``@FILE`` (a file that lists inputs, one
a line) and video files. Every output is named after its input:
``OUT/pred/NAME.png`` holds the class index of each pixel (uint8),
``OUT/vis/NAME.png`` the classes' colours over the image; a video's
frames give ``OUT/pred/NAME_000000.png``, ... and ``OUT/vis/NAME.mp4``.
Each file is written whole, or not at all; none is written over without
``--force``.
"""
import glob
import os
import os.path as osp
import sys
import time
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from ..cli import add_settings, run_cli, settings_from, tool_parser
from ..errors import UsageError
from ..fileio import check_output_path, write_files
from .engine import EngineSettings
from .images import image_size, read_image
from .segmenter import Segmenter

__all__ = [
    'IMAGE_EXTENSIONS', 'VIDEO_EXTENSIONS', 'collect_inputs', 'colour_labels',
    'overlay', 'Timings', 'segment_images', 'segment_video', 'main'
]

# What OpenCV reads, as mmseg's folder inputs list them.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif',
                    '.tiff', '.webp')
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v')
# A progress line every tenth of the run when stderr is no terminal and
# there are at least this many images.
_PROGRESS_LINES_FROM = 100


def _is_image(path):
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _is_video(path):
    return path.lower().endswith(VIDEO_EXTENSIONS)


def _folder_images(folder, recursive):
    if recursive:
        found = (osp.join(root, name) for root, _, names in os.walk(folder)
                 for name in names)
    else:
        found = (osp.join(folder, name) for name in os.listdir(folder))
    return sorted(p for p in found if _is_image(p) and osp.isfile(p))


def _list_file(path):
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f'{path}: cannot read the list ({error})') from error
    base = osp.dirname(path)
    return [osp.join(base, line) for line in lines if line]


def collect_inputs(specs, recursive=False):
    """The image and video files that ``specs`` name, in order, each once.

    Args:
        specs (Sequence[str]): Files, folders, glob patterns, and
            ``@FILE``: a file of such inputs, one a line (relative to it).
        recursive (bool): Take the images of subfolders too.

    Returns:
        list[str]: The files.

    Raises:
        UsageError: A spec that names nothing, or a file that is neither an
            image nor a video.
    """
    files = []
    for spec in specs:
        if spec.startswith('@'):
            files += collect_inputs(_list_file(spec[1:]), recursive)
        elif osp.isdir(spec):
            found = _folder_images(spec, recursive)
            if not found:
                raise UsageError(f'{spec}: holds no images')
            files += found
        elif osp.exists(spec):
            if not (_is_image(spec) or _is_video(spec)):
                raise UsageError(f'{spec}: neither an image ('
                                 f'{", ".join(IMAGE_EXTENSIONS)}) nor a '
                                 f'video ({", ".join(VIDEO_EXTENSIONS)})')
            files.append(spec)
        elif glob.has_magic(spec):
            found = sorted(
                p for p in glob.glob(spec, recursive=recursive)
                if _is_image(p) or _is_video(p))
            if not found:
                raise UsageError(f'{spec}: matches no images or videos')
            files += found
        else:
            raise UsageError(f'{spec}: no such file')
    return list(dict.fromkeys(files))


def colour_labels(labels, palette):
    """A BGR image of ``labels`` in the RGB ``palette``."""
    palette = np.asarray(palette, np.uint8)
    if labels.max() >= len(palette):
        raise UsageError(f'the model predicted class {labels.max()}, but its '
                         f'palette has {len(palette)} colours')
    return palette[labels][..., ::-1]


def overlay(image, colours, opacity, rows=512):
    """``colours`` blended over a BGR ``image`` with ``opacity``, ``rows``
    at a time (the float copies of a whole large image would take GBs)."""
    blend = np.empty_like(image)
    for start in range(0, image.shape[0], rows):
        band = slice(start, start + rows)
        mixed = (
            image[band].astype(np.float32) * (1 - opacity) +
            colours[band].astype(np.float32) * opacity)
        blend[band] = np.clip(mixed + 0.5, 0, 255)
    return blend


def _png(image):
    ok, data = cv2.imencode('.png', image)
    if not ok:
        raise UsageError(f'OpenCV could not encode a {image.shape} PNG')
    return data.tobytes()


@dataclass
class Timings:
    """Seconds spent per step, over the images after the first batch (the
    engine's warm-up) unless it is the only one.

    Attributes:
        preprocess (float): The test resize and the batch.
        inference (float): The engine's runs (and the windows' sums).
        postprocess (float): Logits to label maps.
        files (float): Reading images, colouring and writing PNGs.
        images (int): Images timed.
        wall (float): Wall-clock seconds of those images.
    """
    preprocess: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    files: float = 0.0
    images: int = 0
    wall: float = 0.0

    def describe(self):
        """The speed line: milliseconds per image of each step, and images
        per second."""
        count = max(self.images, 1)
        ms = [
            1000 * t / count for t in (self.preprocess, self.inference,
                                       self.postprocess, self.files)
        ]
        rate = self.images / self.wall if self.wall else 0.0
        return (f'Speed: {ms[0]:.1f}ms preprocess, {ms[1]:.1f}ms inference, '
                f'{ms[2]:.1f}ms postprocess per image, {ms[3]:.1f}ms reading '
                f'and writing files; {rate:.2f} images/s over {self.images} '
                'image(s)')


class _Progress:
    """A progress bar with the time left, on stderr: redrawn in place on a
    terminal, a line every tenth of a long run otherwise."""

    def __init__(self, total, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.enabled = total > 1 and (self.tty
                                      or total >= _PROGRESS_LINES_FROM)
        self.start, self.shown = time.perf_counter(), 0

    def update(self, done):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * (self.total - done)
        bar = '#' * (20 * done // self.total)
        line = (f'{done}/{self.total} [{bar:<20}] {elapsed:.0f}s elapsed, '
                f'{left:.0f}s left')
        if self.tty:
            self.stream.write('\r' + line +
                              ('\n' if done == self.total else ''))
        elif 10 * done // self.total > self.shown:
            self.shown = 10 * done // self.total
            self.stream.write(line + '\n')
        self.stream.flush()


@dataclass
class _Outputs:
    """Where the outputs go, and how."""
    out_dir: str
    opacity: float
    force: bool
    vis: bool

    def paths(self, name, video=False):
        """The label map (a video's first) and the overlay of ``name``."""
        pred = f'{name}_{0:06d}.png' if video else f'{name}.png'
        paths = [osp.join(self.out_dir, 'pred', pred)]
        if self.vis:
            paths.append(
                osp.join(self.out_dir, 'vis',
                         f'{name}.mp4' if video else f'{name}.png'))
        return paths

    def contents(self, name, image, labels, palette):
        contents = {self.paths(name)[0]: _png(labels)}
        if self.vis:
            contents[self.paths(name)[1]] = _png(
                overlay(image, colour_labels(labels, palette), self.opacity))
        return contents


def _names(files):
    names = {}
    for path in files:
        stem = osp.splitext(osp.basename(path))[0]
        if stem in names:
            raise UsageError(f'{path} and {names[stem]} would write the same '
                             f'files ({stem}.png)')
        names[stem] = path
    return {path: stem for stem, path in names.items()}


@dataclass
class _Item:
    """An image on its way through: read, preprocessed, labelled."""
    path: str
    image: np.ndarray
    batch: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None


def segment_images(segmenter, images, outputs, batch=1, progress=None):
    """Segment image files and write each one's outputs as it is done.

    Args:
        segmenter (Segmenter): The model.
        images (Sequence[str]): Image files, their names distinct.
        outputs (_Outputs): Where and how to write.
        batch (int): Images run at once (those of one size after the test
            resize).
        progress (_Progress, optional): Updated after each batch.

    Returns:
        tuple[list[str], Timings]: The files written, and the time spent.
    """
    names, timings, written = _names(images), Timings(), []
    for start in range(0, len(images), batch):
        began, step = time.perf_counter(), Timings()
        tick = time.perf_counter()
        items = [_Item(p, read_image(p)) for p in images[start:start + batch]]
        step.files += time.perf_counter() - tick
        for group in _same_size(segmenter, items, step):
            _run_group(segmenter, group, step)
        tick = time.perf_counter()
        for item in items:
            contents = outputs.contents(names[item.path], item.image,
                                        item.labels, segmenter.info.palette)
            write_files(contents, outputs.force)
            written += list(contents)
        step.files += time.perf_counter() - tick
        # The first batch warms the engine up: timed only if alone.
        if start or len(images) <= batch:
            _add(timings, step, len(items), time.perf_counter() - began)
        if progress:
            progress.update(start + len(items))
    return written, timings


def _same_size(segmenter, items, step):
    """The items preprocessed, in groups of one preprocessed size."""
    tick = time.perf_counter()
    groups = {}
    for item in items:
        item.batch = segmenter.preprocess(item.image)
        groups.setdefault(item.batch.shape, []).append(item)
    step.preprocess += time.perf_counter() - tick
    return groups.values()


def _run_group(segmenter, group, step):
    tick = time.perf_counter()
    outputs = segmenter.infer(np.concatenate([item.batch for item in group]))
    step.inference += time.perf_counter() - tick
    tick = time.perf_counter()
    for index, item in enumerate(group):
        one = tuple(None if o is None else o[index:index + 1] for o in outputs)
        item.labels = segmenter.postprocess(one, item.image.shape[:2])[0]
    step.postprocess += time.perf_counter() - tick


def _add(timings, step, images, wall):
    for name in ('preprocess', 'inference', 'postprocess', 'files'):
        setattr(timings, name, getattr(timings, name) + getattr(step, name))
    timings.images += images
    timings.wall += wall


def segment_video(segmenter, video, outputs):
    """Segment a video's frames: a label PNG per frame
    (``pred/NAME_000000.png``, ...) and, unless ``outputs.vis`` is off,
    the overlay video ``vis/NAME.mp4`` (written whole at the end).

    Returns:
        list[str]: The files written.
    """
    capture = cv2.VideoCapture(video)
    if not capture.isOpened():
        raise UsageError(f'{video}: not a readable video')
    name = osp.splitext(osp.basename(video))[0]
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    vis_path = outputs.paths(name, video=True)[-1] if outputs.vis else None
    temporary = writer = None
    written, index = [], 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            labels = segmenter(frame)
            path = osp.join(outputs.out_dir, 'pred', f'{name}_{index:06d}.png')
            write_files({path: _png(labels)}, outputs.force)
            written.append(path)
            if vis_path:
                if writer is None:
                    temporary, writer = _video_writer(vis_path, fps, frame)
                writer.write(
                    overlay(frame, colour_labels(labels,
                                                 segmenter.info.palette),
                            outputs.opacity))
            index += 1
        if not index:
            raise UsageError(f'{video}: holds no frames that can be read')
        if writer is not None:
            writer.release()
            with open(temporary, 'rb') as f:
                write_files({vis_path: f.read()}, outputs.force)
            written.append(vis_path)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
        if temporary and osp.exists(temporary):
            os.remove(temporary)
    return written


def _video_writer(path, fps, frame):
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = osp.join(folder, f'.{os.urandom(8).hex()}.mp4')
    height, width = frame.shape[:2]
    writer = cv2.VideoWriter(temporary, cv2.VideoWriter_fourcc(*'mp4v'), fps,
                             (width, height))
    if not writer.isOpened():
        raise UsageError(f'{path}: OpenCV cannot write an mp4 video here')
    return temporary, writer


def build_parser():
    """The options of ``mmrepvgg-infer`` and ``tools/infer.py``."""
    parser = tool_parser(
        'Segment images, folders, lists and videos with an ONNX model '
        "exported by mmrepvgg, writing mmseg's pred/ label maps and vis/ "
        'overlays.')
    parser.add_argument('model', help='ONNX model exported by mmrepvgg')
    parser.add_argument(
        'inputs',
        nargs='+',
        metavar='input',
        help='image, folder, glob pattern, video, or @FILE listing inputs')
    parser.add_argument(
        '--out-dir',
        required=True,
        help='where pred/ (label maps) and vis/ (overlays) are written')
    parser.add_argument(
        '--recursive',
        action='store_true',
        help="take the images of folders' subfolders too")
    add_settings(parser, EngineSettings, 'engine')
    parser.add_argument(
        '--batch',
        type=int,
        default=1,
        help='images (of one size) or sliding windows run at once '
        '(default: 1)')
    parser.add_argument(
        '--opacity',
        type=float,
        default=0.5,
        help='of the label colours in the overlays (default: 0.5)')
    parser.add_argument(
        '--no-vis', action='store_true', help='write no overlays')
    parser.add_argument(
        '--force', action='store_true', help='overwrite existing outputs')
    return parser


def _check(args, files, outputs):
    """Check everything before the model loads: arguments, inputs (from
    their headers) and outputs."""
    if not 0 <= args.opacity <= 1:
        raise UsageError(
            f'opacity must be between 0 and 1, got {args.opacity}')
    if args.batch < 1:
        raise UsageError(f'batch must be at least 1, got {args.batch}')
    settings = settings_from(args, EngineSettings).check()
    names = _names(files)
    for path in files:
        if _is_image(path):
            image_size(path)
    inputs = [args.model, *files]
    for path, name in names.items():
        for out in outputs.paths(name, _is_video(path)):
            check_output_path(out, inputs, outputs.force)
    return settings


def main(args):
    """The ``mmrepvgg-infer`` command (and ``tools/infer.py``), given its
    parsed arguments."""
    files = collect_inputs(args.inputs, args.recursive)
    outputs = _Outputs(args.out_dir, args.opacity, args.force, not args.no_vis)
    settings = _check(args, files, outputs)
    segmenter = Segmenter(args.model, settings, args.batch)
    if outputs.vis and not segmenter.info.palette:
        raise UsageError(f'{args.model}: its metadata has no palette to '
                         'colour the labels with (pass --no-vis)')
    images = [f for f in files if not _is_video(f)]
    written = []
    if images:
        done, timings = segment_images(segmenter, images, outputs, args.batch,
                                       _Progress(len(images)))
        written += done
    for video in (f for f in files if _is_video(f)):
        written += segment_video(segmenter, video, outputs)
    for path in written:
        print(f'wrote {path}')
    if images:
        print(timings.describe())


def console():
    """Entry point of the ``mmrepvgg-infer`` console script."""
    run_cli(main, build_parser, intermixed=True)


if __name__ == '__main__':
    console()
