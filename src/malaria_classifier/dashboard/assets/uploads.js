// Take files from the upload box: put them in file-name order, hold back any that break
// the limits (so their data is never sent), clear the box so the same file can be uploaded
// again, and say how many files are being classified. The server checks every limit again.
//
// dcc.Upload hands over files in the order the browser finished reading them, which
// changes from one upload to the next; sorting by name (numbers compared as numbers, so
// cell_9 comes before cell_10) makes the cards, the table and which files a full batch
// holds back the same every time.
window.dash_clientside = Object.assign({}, window.dash_clientside, {
    malaria: {
        takeUpload: function (contents, filenames, limits) {
            const noUpdate = window.dash_clientside.no_update;
            if (!contents || contents.length === 0) {
                return [noUpdate, noUpdate, noUpdate, noUpdate];
            }
            const order = contents.map(function (content, index) { return index; });
            order.sort(function (left, right) {
                return String(filenames[left]).localeCompare(
                    String(filenames[right]), undefined, {numeric: true, sensitivity: "base"}
                ) || left - right;
            });
            const sortedNames = order.map(function (index) { return filenames[index]; });
            let batchBytes = 0;
            const kept = order.map(function (original, index) {
                const content = contents[original];
                const comma = content.indexOf(",");
                const padding = content.endsWith("==") ? 2 : (content.endsWith("=") ? 1 : 0);
                const size = Math.floor(((content.length - comma - 1) * 3) / 4) - padding;
                const fits = index < limits.max_files &&
                    size <= limits.max_file_bytes &&
                    batchBytes + size <= limits.max_batch_bytes;
                if (!fits) {
                    return "dropped:" + size;
                }
                batchBytes += size;
                return content;
            });
            const count = contents.length;
            const text = "Classifying " + count + (count === 1 ? " file" : " files") + "…";
            return [{contents: kept, filenames: sortedNames}, null, null, text];
        }
    }
});
