// Keyboard access to the page's tabs. dash-bootstrap-components renders every tab link
// with tabindex="-1", so Tab never reaches "Model"; give them back their place in the
// tab order (Enter then follows the link, as a click does). Tabs can be re-rendered,
// so this runs again whenever the page changes.
(function () {
    function reachableTabs() {
        document.querySelectorAll('.nav-link[role="tab"][tabindex="-1"]').forEach(
            function (tab) { tab.setAttribute("tabindex", "0"); }
        );
    }
    new MutationObserver(reachableTabs).observe(document.documentElement, {
        childList: true, subtree: true, attributes: true, attributeFilter: ["tabindex"]
    });
    document.addEventListener("DOMContentLoaded", reachableTabs);
})();
