"""brainldm demo: reconstruct what an NSD subject saw from their fMRI (Takagi & Nishimoto, CVPR 2023).

Run `python app.py` (see --help). Sources come from flags or environment variables:
  BRAINLDM_MAPS   fitted maps: a folder of subjNN/ map folders (default: weights/), or a Hub repo id pattern
                  such as "user/brainldm-subj{subject:02d}"
  BRAINLDM_DATA   the prepared trials dataset: a folder or a Hub dataset repo id
  BRAINLDM_MODEL  the LDM (default: the one the maps were fitted for)
With no maps or data, the app builds the offline world: two synthetic subjects (on pycortex's S1 anatomy when pycortex
is installed) reconstructed by the trained offline model `toy`.
"""

from __future__ import annotations

import argparse
import os

import gradio as gr
import numpy as np
import spaces  # before brainldm imports torch: on a ZeroGPU Space it patches torch's CUDA

from brainldm.demo import OFFLINE_BANNER, DemoBackend, gpu_seconds, ordinal, resolve_sources
from brainldm.presets import TAKAGI2023, Sampling
from brainldm.validation import MAX_SEED, InputError

CONCURRENCY_LIMIT = 2  # reconstructions running at once (one GPU)
QUEUE_SIZE = 64  # visitors waiting beyond those; the 65th is told the queue is full

# show_error: an API call with a value Gradio cannot read (a trial "seven") answers with what was wrong, not a bare
# "the app raised an exception"
LAUNCH_OPTIONS = {"show_error": True}
# how the quality table names the decoded targets it knows; any other target (from the maps) shows by its own name
TARGET_NAMES = {
    "z": "z (image latent)",
    "c": "c (caption embedding)",
    "blip": "BLIP image embedding",
    "dpt": "DPT hidden states (depth)",
}
AS_FITTED = "as fitted (the paper)"
RESCALE_CHOICES = {
    AS_FITTED: None,
    "per dimension": "dimension",
    "per target": "target",
}
DEFAULT_RESCALE = "per target"
# what each image is made from, one line under it
CAPTIONS = {
    "presented": "**Presented**: the picture the subject saw",
    "Xz": "**Xz**: the image latent z decoded from early visual cortex",
    "Xc": "**Xc**: generated from c alone, the caption embedding decoded from ventral cortex",
    "Xzc": "**Xzc**: Xz noised to the noise level, then redrawn guided by c",
}
NOISE_INFO = (
    "Shapes Xzc only: how much of Xz is noised away before c redraws it. 1.0 noises all of it away: Xzc then starts "
    "from noise as Xc does, though not from Xc's"
)
CORTICAL_NOTE = (
    "Each map shows, voxel by voxel, how well an encoding model predicts the voxel's response to held-out test "
    "pictures from one LDM feature space (z, c, ...): **test r** is the correlation between predicted and measured "
    "responses, drawn only where it is significant at **q < 0.05 after FDR** correction (the expected share of false "
    "positives among the drawn voxels is at most 5%). z predicts early visual cortex best and c higher, ventral "
    "cortex, as in Takagi & Nishimoto's Figure 5."
)


def quality_report(quality: dict | None, captions: list[str], decoded_caption: str | None = None) -> str:
    """The markdown under the images: how well each decoded target scored when the maps were fitted (one row per
    target the maps hold), then the captions, and the caption decoded from the brain where the maps decode BLIP's
    image embedding."""
    if quality is None:
        table = "This image was not scored when the maps were fitted.\n\n"
    else:
        n = quality["n_candidates"]
        table = (
            f"**How well the maps decoded this trial** (scored when they were fitted): the decoded target's r with the "
            f"true one, and the rank of the true one among the {n} test images' (1 is best; chance is {(n + 1) / 2:g})."
            "\n\n| target | r with the true features | rank of the true features |\n|---|---|---|\n"
        )
        for name, target in quality["targets"].items():
            table += f"| {TARGET_NAMES.get(name, name)} | {target['r']:.3f} | {ordinal(target['rank'])} of {n} |\n"
        table += "\n"
    said = table + f"**Captions of the presented picture**: {' / '.join(captions)}"
    if decoded_caption is not None:
        said += f"\n\n**Caption decoded from the brain** (BLIP, from the decoded image embedding): {decoded_caption}"
    return said


def rank_line(ranks: dict[str, int], n: int, clip_name: str) -> str:
    """One line: where the presented picture ranks among the test pictures by this image's pixels and CLIP."""
    said = [f"{ordinal(ranks['pixels'])} of {n} by pixels"]
    if "clip" in ranks:
        said.append(f"{ordinal(ranks['clip'])} by {clip_name}")
    return f"Presented picture ranked {' and '.join(said)}; chance is {(n + 1) / 2:g}"


def build_demo(backend: DemoBackend) -> gr.Blocks:
    sources = backend.sources
    paper = TAKAGI2023.sampling

    def load_subject(subject):
        try:
            items = backend.gallery(subject)
        except (InputError, OSError) as err:
            raise gr.Error(str(err)) from err
        thumbnails = [path for path, _ in items]  # captions come with the result, in full
        status = f"Subject {subject}: {len(items)} test images. Pick one, then press Reconstruct."
        # only the rescaling the subject's maps support is offered
        choices = list(RESCALE_CHOICES) if backend.subject(subject).maps.can_rescale else [AS_FITTED]
        rescale_choice = gr.update(choices=choices, value=DEFAULT_RESCALE if DEFAULT_RESCALE in choices else AS_FITTED)
        return thumbnails, 0, status, rescale_choice

    def pick(evt: gr.SelectData):
        return evt.index

    # The GPU function gets decoded z and c and returns images: the subject's data, the lock and the decoding
    # stay in the main process. Its ZeroGPU budget follows steps x samples.
    @spaces.GPU(duration=lambda z, c, sampling, keys: gpu_seconds(sampling))
    def generate(z, c, sampling, keys):
        return backend.generate(z, c, sampling, keys)

    def shown(out):
        """The panels' values: the four images (lists, so that samples browse within their panel; PNG files, see
        DemoBackend.image_file), the three images' ranks and the maps' decoding quality."""
        n, clip_name = out["n_candidates"], out["clip_name"]
        lines = [rank_line(out["ranks"][kind], n, clip_name) for kind in ("Xz", "Xc", "Xzc")]
        report = quality_report(out["quality"], out["captions"], out["decoded_caption"])
        if out.get("note"):
            report = f"**Note**: {out['note']}\n\n{report}"
        panels = [[out["presented"]], [out["Xz"]], out["Xc"], out["Xzc"]]
        return *([backend.image_file(image) for image in panel] for panel in panels), *lines, report

    def reconstruct(subject, trial, strength, rescale, guidance, steps, seed, samples,
                    progress=gr.Progress(track_tqdm=True)):  # fmt: skip
        try:
            if rescale not in RESCALE_CHOICES:
                raise InputError(f"rescale must be one of {list(RESCALE_CHOICES)}, got {rescale!r}")
            sampling = Sampling(float(strength), float(guidance), int(steps), int(seed), int(samples))
            out = backend.reconstruct(subject, trial, sampling, generate=generate, rescale=RESCALE_CHOICES[rescale])
        except (InputError, OSError) as err:
            raise gr.Error(str(err)) from err
        return shown(out)

    def showcase(subject, rescale):
        try:
            shown_trials = backend.showcase(subject, rescale=RESCALE_CHOICES[rescale], generate=generate)
        except (InputError, OSError) as err:
            raise gr.Error(str(err)) from err
        return [(item["thumbnail"], item["label"]) for item in shown_trials]

    def open_showcase(subject, rescale, evt: gr.SelectData):
        item = backend.showcase(subject, rescale=RESCALE_CHOICES[rescale], generate=generate)[evt.index]
        return item["trial"], paper.strength, *shown(item)

    def cortical(choice):
        if choice == "all subjects":
            figures = backend.cortical_maps(sources.subjects[0], which="group")
        else:
            figures = backend.cortical_maps(int(choice), which="subject")
        note = (
            CORTICAL_NOTE
            if figures
            else "No cortical maps saved for this subject yet (scripts/encoding.py writes them)."
        )
        return figures, note

    def new_seed():
        return int(np.random.default_rng().integers(0, 2**31))

    with gr.Blocks(title="brainldm: images from brain activity") as demo:
        gr.Markdown(
            "## brainldm: what a person saw, reconstructed from their fMRI with a latent diffusion model\n"
            "Linear maps turn a subject's brain activity into Stable Diffusion's image latent **z** and caption "
            "embedding **c** (Takagi & Nishimoto, CVPR 2023); pick a test picture and see what each carries."
        )
        if sources.offline:
            gr.Markdown(OFFLINE_BANNER, elem_id="offline-banner")
        with gr.Tab("Reconstruct"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=320):
                    with gr.Row():
                        subject = gr.Dropdown(sources.subjects, value=sources.subjects[0], label="Subject", scale=1)
                        trial = gr.Number(0, precision=0, label="Test trial", minimum=0, scale=1)
                    status = gr.Markdown()
                    gallery = gr.Gallery(label="Test images (click one)", columns=6, height=190, allow_preview=False,
                                         elem_id="test-images")  # fmt: skip
                    strength = gr.Slider(0.05, 1.0, paper.strength, step=0.05, label="Noise level (img2img strength)",
                                         info=NOISE_INFO)  # fmt: skip
                    rescale = gr.Radio(
                        list(RESCALE_CHOICES), value=DEFAULT_RESCALE, label="Decoded z and c",
                        info="Ridge shrinks decoded z and c towards the average; rescaling restores the training "
                        "spread (Brain-Diffuser's step; statistics fitted with the maps)",
                    )  # fmt: skip
                    run = gr.Button("Reconstruct", variant="primary")
                    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                        guidance = gr.Slider(
                            1, 15, paper.guidance_scale, step=0.5, label="c strength (guidance)",
                            info="How strongly the decoded caption embedding c steers Xc and Xzc (classifier-free "
                            "guidance; 1 is none)",
                        )  # fmt: skip
                        steps = gr.Slider(10, 100, paper.num_inference_steps, step=1, label="DDIM steps")
                        with gr.Row():
                            seed = gr.Number(paper.seed, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                            reseed = gr.Button("New seed", size="sm")
                        samples = gr.Slider(1, 5, 1, step=1, label="Samples", info="Beyond the first, browse within "
                                            "the Xc and Xzc panels")  # fmt: skip
                with gr.Column(scale=5, min_width=320):
                    panels, lines = {}, {}
                    with gr.Row(equal_height=True):
                        for kind in ("presented", "Xz", "Xc", "Xzc"):
                            with gr.Column(min_width=150, elem_classes="result"):
                                panels[kind] = gr.Gallery(
                                    label=kind if kind != "presented" else "Presented", columns=1, height=256,
                                    object_fit="contain", allow_preview=False, elem_id=kind.lower(),
                                )  # fmt: skip
                                gr.Markdown(CAPTIONS[kind], elem_classes="caption")
                                if kind != "presented":
                                    lines[kind] = gr.Markdown(elem_id=f"{kind.lower()}-score", elem_classes="score")
                    quality = gr.Markdown(label="Decoding quality")
                    showcase_gallery = gr.Gallery(
                        label="Showcase at the paper's settings: the subject's best, median and worst trials by the "
                        "maps' own scores (presented, Xz, Xc, Xzc; click one to open it)",
                        columns=3, height=130, object_fit="contain", allow_preview=False, elem_id="showcase",
                    )  # fmt: skip
        with gr.Tab("Cortical maps"):
            maps_subject = gr.Dropdown(
                ["all subjects", *map(str, sources.subjects)], value="all subjects", label="Subject"
            )
            figures = gr.Gallery(
                label="Encoding accuracy on cortex",
                columns=1,
                object_fit="scale-down",
                height="auto",
                allow_preview=False,
            )
            figures_note = gr.Markdown()

        outputs = [panels["presented"], panels["Xz"], panels["Xc"], panels["Xzc"], *lines.values(), quality]
        subject.change(load_subject, subject, [gallery, trial, status, rescale], api_name="load_subject")
        demo.load(load_subject, subject, [gallery, trial, status, rescale], api_visibility="private")
        gallery.select(pick, None, trial, api_visibility="private")
        reseed.click(new_seed, None, seed, api_visibility="private")
        run.click(reconstruct, [subject, trial, strength, rescale, guidance, steps, seed, samples], outputs,
                  api_name="reconstruct")  # fmt: skip
        subject.change(showcase, [subject, rescale], showcase_gallery, api_name="showcase")
        demo.load(showcase, [subject, rescale], showcase_gallery, api_visibility="private")
        showcase_gallery.select(open_showcase, [subject, rescale], [trial, strength, *outputs],
                                api_visibility="private")  # fmt: skip
        maps_subject.change(cortical, maps_subject, [figures, figures_note], api_name="cortical_maps")
        demo.load(cortical, maps_subject, [figures, figures_note], api_visibility="private")
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", help="fitted maps (default: $BRAINLDM_MAPS or weights/)")
    parser.add_argument("--data", help="prepared trials dataset (default: $BRAINLDM_DATA)")
    parser.add_argument("--model", help="LDM id or folder (default: $BRAINLDM_MODEL or the maps' model)")
    parser.add_argument("--subjects", help="comma-separated subjects to offer (default: those with maps)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args(argv)
    backend = DemoBackend(resolve_sources(args.maps, args.data, args.model, args.subjects), device=args.device)
    build_demo(backend).launch(server_name=args.host, server_port=args.port, **LAUNCH_OPTIONS)


if __name__ == "__main__":
    main()
