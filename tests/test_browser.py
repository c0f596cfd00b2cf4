"""The web app in a real browser: Debian's Chromium, driven by Playwright, against the real
service of test_web.py's ``Site`` (three studies: one in import, one in trial-a, one in
trial-b; the manager ``boss``, the researcher ``rita`` who may read trial-a). One browser for
the module, a fresh context (cookies, cache) per person."""

import io
import os
import re
import zipfile
from pathlib import Path

import pytest

from test_web import PASSWORD, site  # noqa: F401 (the fixture: a running service with its web app)

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = os.environ.get("WATCHER_REQUIRE_BROWSER") == "1"

if not CHROMIUM.exists():
    if REQUIRED:
        raise RuntimeError(f"WATCHER_REQUIRE_BROWSER=1 but there is no {CHROMIUM} (apt-get install chromium)")
    pytest.skip(f"no {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
if REQUIRED:
    from playwright.sync_api import expect, sync_playwright
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]'")
    expect, sync_playwright = sync_api.expect, sync_api.sync_playwright

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def person(browser, site):
    """``person(name)``: a new browser tab of its own (cookies and cache), signed in as name."""
    contexts = []

    def open_as(name, password=PASSWORD):
        context = browser.new_context(base_url=site.url, accept_downloads=True)
        context.set_default_timeout(15000)
        contexts.append(context)
        page = context.new_page()
        page.goto("/login")
        page.get_by_label("Name").fill(name)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
        return page

    yield open_as
    for context in contexts:
        context.close()


def nav(page):
    return page.locator("header")


def test_a_manager_browses_to_the_series_and_distributes_a_study_after_a_dry_run(site, person):
    page = person("boss")
    nav(page).get_by_role("link", name="Databases").click()
    page.get_by_role("link", name="import", exact=True).click()
    expect(page.get_by_role("heading", name="import")).to_be_visible()
    page.get_by_role("link", name="Study 0").click()
    expect(page.locator("td.uid").first).to_have_text(site.import_study)
    series = page.locator("main table").nth(1).locator("tr").nth(1).locator("td")
    expect(series.nth(1)).to_have_text("CT")
    expect(series.nth(4)).to_have_text("1")  # instances
    # a dry run: says what would move, moves nothing
    page.get_by_label("Into").select_option("trial-a")
    page.get_by_role("button", name="Dry run").click()
    expect(page.locator("#plan")).to_contain_text("1 instance would be moved from import to trial-a")
    assert site.get(f"/api/databases/import/studies/{site.import_study}", site.token("boss")).status_code == 200
    # then the move
    page.get_by_role("button", name="Move to trial-a now").click()
    expect(page.locator("#done")).to_contain_text("1 instance moved from import to trial-a")
    page.get_by_role("link", name="The study in trial-a").click()
    expect(page.get_by_role("heading", name="Study 0")).to_be_visible()
    expect(page.locator("body")).to_contain_text("from import by boss (web)")
    page.goto("/databases/trial-a")
    expect(page.get_by_role("link", name="Study 0")).to_be_visible()
    page.goto("/databases/import")
    expect(page.locator("main")).to_contain_text("0 studies")
    # a refusal is shown on the page (a target forged to be the source itself)
    page.goto(f"/databases/trial-a/studies/{site.a_study}")
    page.locator("select[name=to]").evaluate("s => s.options[0].value = 'trial-a'")
    with page.expect_navigation() as navigation:
        page.get_by_role("button", name="Dry run").click()
    assert navigation.value.status == 400
    expect(page.locator("#error")).to_contain_text("in 'trial-a' already")


def test_a_researcher_sees_and_downloads_only_her_database_until_she_signs_out(site, person):
    page = person("rita")
    expect(page.locator("main table").first).to_contain_text("trial-a")
    page.goto("/databases")
    listing = page.locator("main")
    expect(listing).to_contain_text("trial-a")
    expect(listing).not_to_contain_text("trial-b")
    expect(listing).not_to_contain_text("import")
    for link in ("Rejected", "Users"):
        expect(nav(page).get_by_role("link", name=link)).to_have_count(0)
    page.goto(f"/databases/trial-a/studies/{site.a_study}")
    expect(page.get_by_role("heading", name="Study 1")).to_be_visible()
    expect(page.get_by_role("button", name="Dry run")).to_have_count(0)  # read only: nowhere to move it
    for path in (f"/databases/trial-b/studies/{site.b_study}", "/databases/import",
                 f"/databases/trial-a/studies/{site.b_study}"):
        answer = page.goto(path)
        assert answer.status == 404, path
        expect(page.locator("main")).not_to_contain_text("Study 2")
    assert page.goto("/users").status == 403
    assert page.goto("/rejects").status == 403
    page.goto("/")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.content())[1]
    forged = page.request.post(site.url + "/users", form={"name": "mallory", "password": "x" * 12,
                                                          "manager": "1", "csrf": csrf})
    assert forged.status == 403
    assert "mallory" not in site.cli("users", "list")
    # her study's zip, from its page: the original bytes
    page.goto("/databases")
    page.get_by_role("link", name="trial-a").click()
    page.get_by_role("link", name="Study 1").click()
    with page.expect_download() as download:
        page.get_by_role("link", name="Download the originals (zip)").click()
    assert download.value.suggested_filename == f"{site.a_study}.zip"
    data = Path(download.value.path()).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert {n: z.read(n) for n in z.namelist()} == site.originals[site.a_study]
    # signed out, the session is dead: back and reload find the sign-in form, not her study
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.go_back()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.locator("body")).not_to_contain_text("Study 1")
    page.reload()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.request.get(site.url + "/api/databases").status == 401


def test_a_manager_adds_an_account_and_grants_read_and_its_user_then_sees_the_database(site, person):
    boss = person("boss")
    nav(boss).get_by_role("link", name="Users").click()
    expect(boss.get_by_role("heading", name="Users and rights")).to_be_visible()
    form = boss.locator("#add")
    form.get_by_label("Name").fill("nina")
    form.get_by_label("Password").fill("short")
    boss.evaluate("document.querySelector('#add').noValidate = true")
    form.get_by_role("button", name="Add the account").click()
    expect(boss.locator("#error")).to_contain_text("too short")
    form.get_by_label("Password").fill(PASSWORD)  # the name was kept
    form.get_by_role("button", name="Add the account").click()
    nina_row = boss.locator("#account-nina")
    expect(nina_row).to_contain_text("researcher")
    nina_row.get_by_label("database").select_option("trial-b")
    nina_row.get_by_label("level").select_option("read")
    nina_row.get_by_role("button", name="grant").click()
    expect(boss.locator("#account-nina")).to_contain_text("trial-b: read")

    nina = person("nina")
    nina.goto("/databases")
    expect(nina.locator("main")).to_contain_text("trial-b")
    expect(nina.locator("main")).not_to_contain_text("trial-a")
    nina.get_by_role("link", name="trial-b").click()
    nina.get_by_role("link", name="Study 2").click()
    expect(nina.locator("main")).to_contain_text("3 instances")

    # revoked, the database is gone for her; disabled, she is signed out at once
    boss.locator("#account-nina").get_by_role("button", name="revoke").click()
    expect(boss.locator("#account-nina")).not_to_contain_text("trial-b: read")
    assert nina.reload().status == 404
    boss.locator("#account-nina").get_by_role("button", name="disable").click()
    expect(boss.locator("#account-nina")).to_contain_text("(disabled)")
    nina.goto("/databases")
    expect(nina.get_by_role("heading", name="Sign in")).to_be_visible()
