// Keyboard and screen-reader access. dash-bootstrap-components renders every tab link
// with tabindex="-1", so Tab never reaches "Model"; give them back their place in the
// tab order (Enter then follows the link, as a click does). dcc.Upload's hidden file
// input has no name but the browser's "Choose Files"; name it and point it at the
// limits text. Both can be re-rendered, so this runs again whenever the page changes.
(function () {
    function accessible() {
        document.querySelectorAll('.nav-link[role="tab"][tabindex="-1"]').forEach(
            function (tab) { tab.setAttribute("tabindex", "0"); }
        );
        document.querySelectorAll('#upload input[type="file"]:not([aria-label])').forEach(
            function (input) {
                input.setAttribute("aria-label", "Upload cell images to classify");
                input.setAttribute("aria-describedby", "upload-limits");
            }
        );
    }
    new MutationObserver(accessible).observe(document.documentElement, {
        childList: true, subtree: true, attributes: true, attributeFilter: ["tabindex"]
    });
    document.addEventListener("DOMContentLoaded", accessible);
})();
