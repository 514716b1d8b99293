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
import spaces  # before brainldm imports torch: on a ZeroGPU Space it patches torch's CUDA

from brainldm.demo import OFFLINE_BANNER, DemoBackend, Sources, find_subjects, gpu_seconds, offline_sources
from brainldm.presets import TAKAGI2023, Sampling
from brainldm.validation import MAX_SEED, InputError

CONCURRENCY_LIMIT = 2  # reconstructions running at once (one GPU)
QUEUE_SIZE = 64
SHOWCASE = (TAKAGI2023.sampling.strength, TAKAGI2023.sampling.guidance_scale,
            TAKAGI2023.sampling.num_inference_steps, TAKAGI2023.sampling.seed, 1)  # fmt: skip


# show_error: an API call with a value Gradio cannot read (a trial "seven") answers with what was wrong, not a bare
# "the app raised an exception"
LAUNCH_OPTIONS = {"show_error": True}
# how the quality table names the decoded targets it knows; any other target (from the maps) shows by its own name
TARGET_NAMES = {"z": "z (image latent)", "c": "c (caption embedding)"}


def quality_report(quality: dict | None, captions: list[str]) -> str:
    """The markdown under the images: how well each decoded target scored at fit time (one row per target the maps
    hold), then the captions."""
    if quality is None:
        table = "This image was not scored when the maps were fitted.\n\n"
    else:
        table = f"| | r with the true features | identification rank (of {quality['n_candidates']}) |\n|---|---|---|\n"
        for name, target in quality["targets"].items():
            table += f"| {TARGET_NAMES.get(name, name)} | {target['r']:.3f} | {target['rank']} |\n"
        table += "\n"
    return table + f"Captions: {' / '.join(captions)}"


def resolve_sources(maps: str | None, data: str | None, model: str | None, subjects: str | None) -> Sources:
    maps = maps or os.environ.get("BRAINLDM_MAPS") or "weights"
    data = data or os.environ.get("BRAINLDM_DATA")
    model = model or os.environ.get("BRAINLDM_MODEL")
    if subjects:
        chosen = [int(s) for s in subjects.split(",")]
    elif "{subject" in maps:
        chosen = list(TAKAGI2023.subjects)
    else:
        chosen = find_subjects(maps) if os.path.isdir(maps) else [1]
    if not data or not chosen:
        return offline_sources()
    return Sources(maps=maps, data=data, model=model, subjects=chosen)


def build_demo(backend: DemoBackend) -> gr.Blocks:
    sources = backend.sources

    def load_subject(subject):
        try:
            items = backend.gallery(subject)
        except (InputError, OSError) as err:
            raise gr.Error(str(err)) from err
        return items, 0, f"Subject {subject}: {len(items)} test images. Pick one, then press Reconstruct."

    def pick(evt: gr.SelectData):
        return evt.index

    # The GPU function gets decoded z and c and returns images: the subject's data, the lock and the decoding
    # stay in the main process. Its ZeroGPU budget follows steps x samples.
    @spaces.GPU(duration=lambda z, c, sampling: gpu_seconds(sampling))
    def generate(z, c, sampling):
        return backend.generate(z, c, sampling)

    def reconstruct(subject, trial, strength, guidance, steps, seed, samples, progress=gr.Progress(track_tqdm=True)):
        try:
            sampling = Sampling(float(strength), float(guidance), int(steps), int(seed), int(samples))
            out = backend.reconstruct(subject, trial, sampling, generate=generate)
        except (InputError, OSError) as err:
            raise gr.Error(str(err)) from err
        report = quality_report(out["quality"], out["captions"])
        return out["presented"], out["Xz"], out["Xc"], out["Xzc"], report

    def cortical(subject):
        figures = backend.cortical_maps(subject)
        note = "" if figures else "No cortical maps saved for this subject yet (scripts/encoding.py writes them)."
        return figures, note

    with gr.Blocks(title="brainldm: images from brain activity") as demo:
        gr.Markdown(
            "# brainldm: high-resolution image reconstruction from brain activity\n"
            "Linear maps turn a subject's fMRI (NSD) into Stable Diffusion's image latent **z** and caption "
            "embedding **c**; **Xz** decodes z, **Xc** generates from c, **Xzc** is img2img from Xz guided by c "
            "(Takagi & Nishimoto, CVPR 2023)."
        )
        if sources.offline:
            gr.Markdown(OFFLINE_BANNER, elem_id="offline-banner")
        with gr.Tab("Reconstruct"):
            with gr.Row():
                subject = gr.Dropdown(sources.subjects, value=sources.subjects[0], label="Subject")
                trial = gr.Number(0, precision=0, label="Test trial", minimum=0)
                status = gr.Markdown()
            gallery = gr.Gallery(label="Test images (click one)", columns=8, height=260, allow_preview=False)
            with gr.Row():
                strength = gr.Slider(
                    0.05, 1.0, TAKAGI2023.sampling.strength, step=0.05, label="Noise level (img2img strength)",
                    info="How much of Xz is noised away before c redraws it: near 0 keeps Xz, 1 ignores it",
                )  # fmt: skip
                guidance = gr.Slider(
                    1, 15, TAKAGI2023.sampling.guidance_scale, step=0.5, label="c strength (guidance)",
                    info="How strongly the decoded caption embedding c steers Xc and Xzc (classifier-free guidance)",
                )  # fmt: skip
                steps = gr.Slider(10, 100, TAKAGI2023.sampling.num_inference_steps, step=1, label="DDIM steps")
                seed = gr.Number(TAKAGI2023.sampling.seed, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                samples = gr.Slider(1, 5, 1, step=1, label="Samples")
            run = gr.Button("Reconstruct", variant="primary")
            with gr.Row():
                presented = gr.Image(label="Presented image", height=320, elem_id="presented")
                xz = gr.Image(label="Xz (from z)", height=320, elem_id="xz")
                xc = gr.Gallery(label="Xc (from c)", columns=1, height=320, object_fit="contain", elem_id="xc")
                xzc = gr.Gallery(label="Xzc (z and c)", columns=1, height=320, object_fit="contain", elem_id="xzc")
            quality = gr.Markdown(label="Decoding quality")
            # the showcase: computed on first use, then served from Gradio's cache to every visitor
            gr.Examples(
                [[sources.subjects[0], t, *SHOWCASE] for t in range(3)],
                [subject, trial, strength, guidance, steps, seed, samples],
                [presented, xz, xc, xzc, quality],
                fn=reconstruct,
                cache_examples=True,
                cache_mode="lazy",
                label="Showcase (the paper's settings)",
            )
        with gr.Tab("Cortical maps"):
            figures = gr.Gallery(
                label="Encoding accuracy on cortex (flatmaps first)", preview=True, object_fit="contain", height=700
            )
            figures_note = gr.Markdown()

        subject.change(load_subject, subject, [gallery, trial, status], api_name="load_subject")
        demo.load(load_subject, subject, [gallery, trial, status], api_visibility="private")
        gallery.select(pick, None, trial, api_visibility="private")
        run.click(
            reconstruct,
            [subject, trial, strength, guidance, steps, seed, samples],
            [presented, xz, xc, xzc, quality],
            api_name="reconstruct",
        )
        subject.change(cortical, subject, [figures, figures_note], api_name="cortical_maps")
        demo.load(cortical, subject, [figures, figures_note], api_visibility="private")
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
