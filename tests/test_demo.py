"""The demo page (pipeline.demo): the command line's answers, the prompt's pictures, the limits, and the page
driven in a real headless Chromium.

The browser is Debian's ``chromium`` driven through its ``chromium-driver`` (``make test`` installs both when
missing and possible); where there is none, the browser test is skipped with that reason.
"""
from __future__ import annotations

import io
import shutil
import socket
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.demo.__main__ import build_parser, serve
from pipeline.demo.inputs import InputError, Limits, Sampling, check_question, check_sampling
from pipeline.demo.models import load_demo_model, question_share
from pipeline.demo.page import build_page, respond
from pipeline.generate import answer
from pipeline.generate import main as generate_cli
from pipeline.inspect.masks import ADDED, ROLE_COLORS
from pipeline.inspect.roles import Role

MAX_NEW_TOKENS = 12
QUESTIONS = ["What color is the circle?", "How many squares are there?", "Is the circle on the left or the right?",
             "What is shown in the image?", "Is there a red circle above a blue square?"]
MAX_QUESTION_CHARS = 60     # the browser test's server
# gradio's own calls of what pandas 3 and starlette deprecate
pytestmark = [pytest.mark.filterwarnings("ignore:::gradio.queueing"),
              pytest.mark.filterwarnings("ignore:::gradio.routes")]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1100"]


def pixels_of(picture: Image.Image, color: np.ndarray) -> int:
    """How many pixels of ``picture`` have ``color`` (RGB in [0, 1])."""
    pixels = np.asarray(picture.convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.round(color * 255)).max(axis=-1) <= 2).sum())


@pytest.fixture(scope="module")
def exports(tiny_export, tmp_path_factory) -> dict[str, str]:
    """Two tiny exports with the same weights: the shared MMA one and its causal twin."""
    from pipeline.model.aki import AKIModel

    causal = tmp_path_factory.mktemp("demo") / "tiny_causal"
    AKIModel.from_pretrained(tiny_export, attention_mode="causal").save_pretrained(causal)
    return {"mma": tiny_export, "causal": str(causal)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """A PNG with a red circle and a blue square, and a JPEG cut in half (a damaged upload)."""
    folder = tmp_path_factory.mktemp("demo_images")
    img = Image.new("RGB", (96, 64), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((8, 16, 40, 48), fill=(220, 30, 30))
    draw.rectangle((56, 16, 88, 48), fill=(30, 60, 220))
    img.save(folder / "shapes.png")
    jpeg = io.BytesIO()
    img.save(jpeg, format="JPEG")
    (folder / "damaged.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    return {"shapes": str(folder / "shapes.png"), "damaged": str(folder / "damaged.jpg")}


@pytest.fixture(scope="module")
def models(exports):
    return {mode: load_demo_model(folder, "cpu") for mode, folder in exports.items()}


@pytest.fixture(scope="module")
def cases(models, images) -> list[tuple[str, dict[str, str]]]:
    """Two questions about the shapes image and ``pipeline.generate``'s answers to them from both models: answers
    of printable text of several words (the page shows them verbatim and streams them in more than one piece),
    different from one question to the other."""
    found: list[tuple[str, dict[str, str]]] = []
    for question in QUESTIONS:
        expected = {mode: answer(dm.model, question, [images["shapes"]], max_new_tokens=MAX_NEW_TOKENS)
                    for mode, dm in models.items()}
        if all(a.isprintable() and " " in a for a in expected.values()) and all(e != expected for _, e in found):
            found.append((question, expected))
        if len(found) == 2:
            return found
    pytest.fail(f"fewer than two of {QUESTIONS} have printable answers of several words from both tiny models")


def test_page_answers_as_the_command_line_streaming_with_the_prompt_pictures(models, exports, images, cases,
                                                                            capsys):
    question, expected = cases[0]
    checked = check_question(question, [images["shapes"]], Limits())
    masks = {}
    for mode, dm in models.items():
        generate_cli(["--checkpoint", exports[mode], "--image", images["shapes"], "--question", question,
                      "--max-new-tokens", str(MAX_NEW_TOKENS)])
        assert capsys.readouterr().out == expected[mode] + "\n"
        updates = list(respond(dm, (checked, Sampling(max_new_tokens=MAX_NEW_TOKENS))))
        texts = [text for text, *_ in updates]
        assert texts[-1] == expected[mode]
        assert len({t for t in texts[:-1] if t}) >= 2, f"{mode}: the answer did not stream: {texts}"
        mask = updates[0][1]
        assert mask is not None and all(u[1] is mask for u in updates)     # drawn before the answer streams
        masks[mode] = mask
        _, _, plot, share_text = updates[-1]
        assert plot is not None and "per layer" in share_text
    # the prompt's roles along the axes (image slots in orange); MMA's unlocked paths in red (beside the same legend)
    assert all(pixels_of(mask, ROLE_COLORS[Role.IMAGE]) > 0 for mask in masks.values())
    assert pixels_of(masks["mma"], ADDED) > pixels_of(masks["causal"], ADDED)


def test_attention_share_is_the_eager_models_and_the_model_answers_as_before(models, exports, images, cases):
    from pipeline.eval.runner import load_model
    from pipeline.inspect.samples import question_sample
    from pipeline.inspect.share import measure

    question, expected = cases[0]
    checked = check_question(question, [images["shapes"]], Limits())
    for mode, dm in models.items():
        eager, tokenizer = load_model(exports[mode], "cpu", attn_implementation="eager")
        sample = question_sample(tokenizer, question, [images["shapes"]], eager.num_visual_tokens, eager.text_layout)
        reference = measure(eager, [sample])["per_layer"]
        share = question_share(dm, checked)
        assert share == pytest.approx(reference, abs=1e-6)
        assert (max(share) == 0) == (mode == "causal")
        assert dm.model.attn_implementation == "sdpa" and dm.model.llm.config._attn_implementation == "sdpa"
        assert answer(dm.model, question, [images["shapes"]], max_new_tokens=MAX_NEW_TOKENS) == expected[mode]
    assert question_share(models["mma"], check_question(question, [], Limits())) is None


@pytest.mark.parametrize("text,image_keys,limits,message", [
    ("", ["shapes"], Limits(), "type a question"),
    ("x" * 41, ["shapes"], Limits(max_question_chars=40), "41 characters long; this page takes at most 40"),
    ("Count?", ["shapes"] * 3, Limits(max_images=2), "3 images uploaded; this page takes at most 2"),
    ("Count?", ["shapes"], Limits(max_image_pixels=96 * 64 - 1), "96×64"),
    ("Count?", ["shapes"], Limits(max_image_mb=1e-4), "MiB; this page takes images up to"),
    ("Count?", ["shapes", "damaged"], Limits(), "image 'damaged.jpg' cannot be read"),
])
def test_limits_and_damaged_images_are_refused_with_a_clear_message(images, text, image_keys, limits, message):
    with pytest.raises(InputError, match=message.replace("?", r"\?")):
        check_question(text, [images[k] for k in image_keys], limits)
    assert check_question(" Count? ", [images["shapes"]], Limits()).text == "Count?"


def test_sampling_settings_out_of_range_are_refused():
    assert check_sampling(16, 0.7, 0.9, None, Limits()) == Sampling(16, 0.7, 0.9, 0)
    with pytest.raises(InputError, match="this page generates 1 to 512"):
        check_sampling(513, 0.0, 1.0, 0, Limits())
    with pytest.raises(InputError, match="need temperature >= 0"):
        check_sampling(16, -1.0, 1.0, 0, Limits())


def test_each_model_answers_in_its_own_queue_of_one(models):
    page = build_page(list(models.values()), max_queue=5)
    answering = [fn for fn in page.fns.values() if fn.api_name.startswith("answer_")]
    assert [fn.concurrency_limit for fn in answering] == [1, 1]
    assert len({fn.concurrency_id for fn in answering}) == 2
    assert page._queue.max_size == 5


# --------------------------------------------------------------------------------------------- the browser

@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Debian's headless Chromium and its chromium-driver: ``(browser, driver)`` paths."""
    paths = shutil.which("chromium"), shutil.which("chromedriver")
    if None in paths:
        pytest.skip("no headless Chromium: the browser test needs Debian's `chromium` and `chromium-driver` "
                    "(`make test` installs them when it runs as root with apt-get; else "
                    "`sudo apt-get install chromium chromium-driver`)")
    return paths


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    """A headless Chromium session with a fresh profile, driven through WebDriver (nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium[0]
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"]:
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=Service(chromium[1], log_output=subprocess.DEVNULL))
    yield session
    session.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(exports):
    """``python -m pipeline.demo`` with both models, started in this process by the command's own code."""
    args = build_parser().parse_args(["--model", exports["mma"], "--model", exports["causal"], "--device", "cpu",
                                      "--port", str(_free_port()), "--max-new-tokens", str(MAX_NEW_TOKENS),
                                      "--max-question-chars", str(MAX_QUESTION_CHARS)])
    page = serve(args)
    yield page
    page.close()


def test_the_page_in_a_real_browser(chromium, server, browser, images, cases):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert server.server_name == "127.0.0.1" and not server.share
    wait = WebDriverWait(browser, 30)
    find = browser.find_element

    def upload(path: str) -> None:
        name = path.rsplit("/", 1)[-1]
        find(By.CSS_SELECTOR, "#images input[type=file]").send_keys(path)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f'#images td.filename[aria-label="{name}"]'))

    def ask(text: str) -> None:
        box = find(By.CSS_SELECTOR, "#question textarea")
        box.clear()
        box.send_keys(text)
        find(By.ID, "ask").click()

    def answers() -> dict[str, str]:
        return {mode: find(By.CSS_SELECTOR, f"#answer-{i} textarea").get_property("value")
                for i, mode in enumerate(("mma", "causal"))}

    def wait_for_answers(expected: dict[str, str]) -> None:
        try:
            wait.until(lambda b: answers() == expected)
        except TimeoutException:
            assert answers() == expected    # shows what the page holds instead

    def error_shown(part: str) -> None:
        """An error message holding ``part`` appears on the page; it is then closed."""
        def messages(b) -> list[str]:
            return [t.text for t in b.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]")]

        try:
            wait.until(lambda b: any(part in m for m in messages(b)))
        except TimeoutException:
            shown = messages(browser)
            pytest.fail(f"no error message with {part!r} on the page; it shows {shown}")
        for close in browser.find_elements(By.CSS_SELECTOR, "[data-testid=toast-close]"):
            close.click()

    browser.get(server.local_url)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#images input[type=file]"))
    (question, expected), (second, expected_second) = cases
    upload(images["shapes"])
    ask(question)
    wait_for_answers(expected)
    wait.until(lambda b: b.execute_script(
        "return [0, 1].every(i => { const img = document.querySelector(`#mask-${i} img`);"
        " return img !== null && img.complete && img.naturalWidth > 500; });"))
    wait.until(lambda b: "(mean 0.000)" in find(By.ID, "share-1").text)     # causal: images never read the question

    find(By.CSS_SELECTOR, "#images button[aria-label=Clear]").click()
    upload(images["damaged"])
    ask(second)
    error_shown("image 'damaged.jpg' cannot be read")
    find(By.CSS_SELECTOR, "#images button[aria-label=Clear]").click()
    upload(images["shapes"])
    ask("x" * (MAX_QUESTION_CHARS + 1))
    error_shown(f"{MAX_QUESTION_CHARS + 1} characters long")
    assert answers() == expected                                            # no model was asked

    ask(second)
    wait_for_answers(expected_second)
